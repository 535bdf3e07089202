"""Image files to model tensors, and back: the pixel-level helpers that need torch."""

from __future__ import annotations

import numpy as np
import torch


def to_model_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], the models' input range."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr_per_image(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of (B, 3, H, W) reconstructions against images, both in [-1, 1]."""
    mse = (recon.clamp(-1, 1) - images).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)  # peak-to-peak range 2 -> peak^2 = 4
