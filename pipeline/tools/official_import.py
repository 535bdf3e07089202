"""`rqpipe import-official`: an official checkpoint + its config.yaml -> our model folder.

The checkpoint is opened with torch.load(weights_only=True): tensors and plain containers only,
never an arbitrary unpickle. The mapping itself is model/weights/official.py. Beside model.safetensors +
config.json the folder gets `import.json`: where the weights came from (file name, SHA-256,
which state dict) and every dropped tensor with why.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from typing import Any

import torch
import yaml

from model.rqvae import RQVAE
from model.weights import official
from pipeline.core.storage import Storage, join

KINDS = ("rqvae", "rqtransformer")


def read_checkpoint(storage: Storage, uri: str) -> tuple[dict[str, Any], str]:
    """-> (the checkpoint's top-level dict, the file's SHA-256)."""
    data = storage.read_bytes(uri)
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0]
        raise official.OfficialFormatError(
            f"{uri}: refused to unpickle it (weights_only=True allows tensors and plain "
            f"containers only): {first}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise official.OfficialFormatError(f"{uri}: holds a {type(checkpoint).__name__}, not "
                                           f"a checkpoint dict")  # fmt: skip
    return checkpoint, hashlib.sha256(data).hexdigest()


def model_state(checkpoint: dict[str, Any], uri: str, ema: bool) -> tuple[dict, dict[str, str]]:
    """The weights to import (`state_dict`, or `state_dict_ema` with ema=True; a bare state
    dict is taken as is) and the top-level entries left out, with why."""
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        if ema:
            raise official.OfficialFormatError(f"{uri}: a bare state dict has no EMA weights")
        return checkpoint, {}
    wanted = "state_dict_ema" if ema else "state_dict"
    if wanted not in checkpoint:
        raise official.OfficialFormatError(f"{uri}: no {wanted!r} entry (it has "
                                           f"{sorted(checkpoint)})")  # fmt: skip
    unknown = sorted(set(checkpoint) - {wanted, "state_dict", *official.TRAINING_ONLY_KEYS})
    if unknown:
        raise official.OfficialFormatError(f"{uri}: unknown top-level entries {unknown}")
    left_out = {k: "training state, not used by inference" for k in checkpoint if k != wanted}
    if ema:
        left_out["state_dict"] = "the raw weights (the EMA weights were imported)"
    elif "state_dict_ema" in checkpoint:
        left_out["state_dict_ema"] = "the EMA weights (add --ema to import them instead)"
    return checkpoint[wanted], left_out


def import_official(
    kind: str,
    checkpoint_uri: str,
    config_uri: str,
    out_uri: str,
    rqvae_uri: str | None = None,
    ema: bool = False,
    storage: Storage | None = None,
) -> dict[str, Any]:
    """Write our model folder at out_uri; returns the import record (also `import.json`)."""
    storage = storage or Storage()
    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r}: choose one of {list(KINDS)}")
    if kind == "rqtransformer" and not rqvae_uri:
        raise ValueError("--kind rqtransformer needs --rqvae: the imported RQ-VAE the "
                         "transformer was trained on (its codebook embeds the codes)")  # fmt: skip
    for uri in (checkpoint_uri, config_uri, *([rqvae_uri] if rqvae_uri else [])):
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri}: not found")
    document = yaml.safe_load(storage.read_bytes(config_uri))
    if not isinstance(document, dict):
        raise official.OfficialFormatError(f"{config_uri}: not a YAML mapping")
    checkpoint, sha256 = read_checkpoint(storage, checkpoint_uri)
    state, left_out = model_state(checkpoint, checkpoint_uri, ema)

    if kind == "rqvae":
        model, dropped = official.import_rqvae(state, official.rqvae_config(document))
    else:
        config = official.rqtransformer_config(document)
        vae = RQVAE.from_pretrained(rqvae_uri, storage_options=storage.options(rqvae_uri))
        if (vae.config.codebook_size, vae.config.code_depth) != (config.codebook_size,
                                                                 config.depth):  # fmt: skip
            raise ValueError(f"--rqvae {rqvae_uri}: K={vae.config.codebook_size}, "
                             f"D={vae.config.code_depth}, but the transformer's config has "
                             f"K={config.codebook_size}, D={config.depth}")  # fmt: skip
        model, dropped = official.import_rqtransformer(state, config, vae.quantizer.codebooks)
    model.save_pretrained(out_uri, storage.options(out_uri))
    record = {
        "kind": kind,
        "checkpoint": checkpoint_uri.rsplit("/", 1)[-1],
        "checkpoint_sha256": sha256,
        "config": config_uri.rsplit("/", 1)[-1],
        "weights": "state_dict_ema" if ema else "state_dict",
        "rqvae": rqvae_uri,
        "tensors_imported": len(state) - sum("[" not in k for k in dropped),
        "dropped_tensors": dropped,
        "left_out": left_out,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    storage.write_bytes(join(out_uri, "import.json"), json.dumps(record, indent=2).encode())
    return record
