"""`rqpipe push`: a model folder (local or on an object store) to a Hugging Face Hub repo."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from model.weights.hub import MODEL_FILES
from pipeline.core.storage import Storage, join


def push_model(storage: Storage, folder: str, repo_id: str, private: bool = False) -> str:
    """Upload config.json + model.safetensors (+ import.json) of `folder`; -> the repo's URL.
    The token comes from HF_TOKEN or `hf auth login`, never from rqpipe's config."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    present = [name for name in MODEL_FILES if storage.exists(join(folder, name))]
    if not {"config.json", "model.safetensors"} <= set(present):
        raise FileNotFoundError(f"{folder}: not a model folder (config.json + "
                                f"model.safetensors, e.g. RUN/vae/model)")  # fmt: skip
    if "model_type" not in json.loads(storage.read_bytes(join(folder, "config.json"))):
        raise ValueError(f"{folder}/config.json was not written by rqpipe (no model_type)")
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset it")
    if get_token() is None:
        raise PermissionError("no Hugging Face token: set HF_TOKEN (a write token) or run "
                              "`hf auth login`")  # fmt: skip
    api = HfApi()
    try:
        with tempfile.TemporaryDirectory() as staging:
            for name in present:  # object-store folders are staged locally first
                (Path(staging) / name).write_bytes(storage.read_bytes(join(folder, name)))
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(folder_path=staging, repo_id=repo_id,
                              commit_message=f"rqpipe push {folder.rsplit('/', 1)[-1]}")  # fmt: skip
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as error:
        raise ConnectionError(
            f"push to {repo_id} failed: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    return str(url)
