"""Models on the Hugging Face Hub: `hf://org/name[@revision]` (or a plain `org/name` that is no
local path) beside fsspec URIs, fetched through huggingface_hub into its own cache."""

from __future__ import annotations

import os
import re

HUB_PREFIX = "hf://"
MODEL_FILES = ["config.json", "model.safetensors", "import.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_repo(uri: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `uri` names a Hub model, else None (a path or fsspec URI).

    'hf://org/name', 'hf://org/name@v1' and a plain 'org/name' that does not exist locally
    name Hub models; 'runs/x/vae/model', './org/name', 's3://b/k' and existing folders do not."""
    if uri.startswith(HUB_PREFIX):
        rest = uri[len(HUB_PREFIX):].rstrip("/")  # fmt: skip
    elif "://" not in uri and _REPO_ID.match(uri.split("@")[0]) and not os.path.exists(uri):
        rest = uri
    else:
        return None
    repo_id, _, revision = rest.partition("@")
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"{uri!r}: a Hub model is hf://org/name or hf://org/name@revision")
    return repo_id, revision or None


def download_model(uri: str) -> str:
    """The local folder (in the Hugging Face cache) holding the Hub model `uri`."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = hub_repo(uri) or (None, None)
    if repo_id is None:
        raise ValueError(f"{uri!r} is not a Hub model (hf://org/name)")
    local = "" if uri.startswith(HUB_PREFIX) else "no local folder of that name, and "
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise FileNotFoundError(
            f"{uri}: {local}no model {repo_id}{'@' + revision if revision else ''} on the "
            f"Hugging Face Hub (a private repo needs HF_TOKEN)"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError) as error:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(
            f"{uri}: {local}{repo_id} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and the Hub cannot be reached{offline}: run "
            f"`hf download {repo_id}` where there is a network (same HF_HOME), or give a "
            f"local folder ({type(error).__name__})"
        ) from None
