"""The bundled demo dataset: procedural shapes in class folders, generated deterministically.

Each class is a shape (circle, square, triangle, cross); colours, sizes, positions and
backgrounds vary. 512 images a class: with 128 the demo's RQ-Transformer overfit them (its
validation loss rose after 1,200 of its 1,500 steps) and the class check stayed below 90%. Files are real PNGs in `{root}/{class}/{class}_{i:04d}.png`, as a user's
dataset with class sub-folders would be.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_CLASSES = ("circle", "square", "triangle", "cross")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                colour: tuple[int, int, int]) -> None:  # fmt: skip
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    else:
        raise ValueError(f"unknown demo shape {shape!r}")


def demo_image(shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(0, 110, 3))
    colour = tuple(int(v) for v in rng.integers(140, 256, 3))
    image = Image.new("RGB", (size, size), background)
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = (size / 2 + size * rng.uniform(-0.12, 0.12, 2)).tolist()
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, colour)
    return image


def write_demo_dataset(root: str | os.PathLike, per_class: int = 512, size: int = 64,
                       seed: int = 0) -> list[Path]:  # fmt: skip
    """Write the dataset (skipping files already present) and return the paths, sorted."""
    root = Path(root)
    paths = []
    for label, shape in enumerate(DEMO_CLASSES):
        rng = np.random.default_rng([seed, label])
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = demo_image(shape, rng, size)  # drawn even when present: keeps rng in step
            path = root / shape / f"{shape}_{i:04d}.png"
            if not path.exists():
                tmp = path.with_suffix(".tmp.png")
                image.save(tmp)
                tmp.replace(path)
            paths.append(path)
    return sorted(paths)
