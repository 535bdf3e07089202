"""Image files to model tensors, and back: the pixel-level helpers that need torch."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from pipeline.decode import center_square


def load_rgb(path: str | os.PathLike, size: int) -> np.ndarray:
    """An image file -> (size, size, 3) uint8, centre-cropped to a square and resized."""
    with Image.open(path) as image:
        return center_square(image.convert("RGB"), size)


def to_model_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], the models' input range."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr_per_image(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of (B, 3, H, W) reconstructions against images, both in [-1, 1]."""
    mse = (recon.clamp(-1, 1) - images).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)  # peak-to-peak range 2 -> peak^2 = 4
