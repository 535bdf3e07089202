"""Pictures people look at: image grids (reconstructions, samples)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from model.fileio import write_bytes_atomic


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(rows: list[torch.Tensor], scale: int = 1, pad: int = 2) -> Image.Image:
    """Rows of (N, 3, H, W) images in [-1, 1] -> one PIL image, each tile upscaled `scale`x."""
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[2] * scale, rows[0].shape[3] * scale
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(to_uint8(row)):
            tile = tile.repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = tile
    return Image.fromarray(canvas)


def save_png(image: Image.Image, uri: str, storage_options: dict | None = None) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(uri, buffer.getvalue(), storage_options)
