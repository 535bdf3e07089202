"""Torch modules of rqpipe: residual quantizer, RQ-VAE, its losses. No Ray, no storage."""

from model.losses import PatchDiscriminator, PerceptualLoss, VAELoss, VAELossConfig
from model.quantizer import QuantizerOutput, ResidualQuantizer, nearest_codes
from model.rqvae import RQVAE, RQVAEConfig, RQVAEOutput

__all__ = [
    "RQVAE",
    "PatchDiscriminator",
    "PerceptualLoss",
    "QuantizerOutput",
    "RQVAEConfig",
    "RQVAEOutput",
    "ResidualQuantizer",
    "VAELoss",
    "VAELossConfig",
    "nearest_codes",
]
