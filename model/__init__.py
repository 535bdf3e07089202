"""Torch modules of rqpipe: residual quantizer, RQ-VAE and its losses, RQ-Transformer.

No Ray, no storage beyond save/load."""

from model.losses import PatchDiscriminator, PerceptualLoss, VAELoss, VAELossConfig
from model.quantizer import QuantizerOutput, ResidualQuantizer, nearest_codes
from model.rqtransformer import RQTransformer, RQTransformerConfig
from model.rqvae import RQVAE, RQVAEConfig, RQVAEOutput

__all__ = [
    "RQVAE",
    "PatchDiscriminator",
    "PerceptualLoss",
    "QuantizerOutput",
    "RQTransformer",
    "RQTransformerConfig",
    "RQVAEConfig",
    "RQVAEOutput",
    "ResidualQuantizer",
    "VAELoss",
    "VAELossConfig",
    "nearest_codes",
]
