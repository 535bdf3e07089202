"""Image files to model tensors."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def load_rgb(path: str | os.PathLike, size: int) -> np.ndarray:
    """An image file -> (size, size, 3) uint8, centre-cropped to a square and resized."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))


def to_model_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], the models' input range."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
