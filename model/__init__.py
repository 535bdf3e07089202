"""Torch modules of rqpipe: residual quantizer, RQ-VAE and its losses, RQ-Transformer.

No Ray, no storage beyond save/load. Names are imported on first use, so that
`model.weights.fileio` stays importable without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PatchDiscriminator": "model.losses",
    "PerceptualLoss": "model.losses",
    "VAELoss": "model.losses",
    "VAELossConfig": "model.losses",
    "QuantizerOutput": "model.quantizer",
    "ResidualQuantizer": "model.quantizer",
    "nearest_codes": "model.quantizer",
    "RQTransformer": "model.rqtransformer",
    "RQTransformerConfig": "model.rqtransformer",
    "RQVAE": "model.rqvae",
    "RQVAEConfig": "model.rqvae",
    "RQVAEOutput": "model.rqvae",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
