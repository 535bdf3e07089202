"""The bundled demo dataset: procedural shapes in class folders, generated deterministically,
with a caption for each image.

Each class is a shape (circle, square, triangle, cross) in one of six named colours (jittered);
sizes, positions and backgrounds vary. The caption says what is drawn: "a small red circle on
the left". One colour per shape never occurs (`UNSEEN`): prompts for those combinations test
whether a caption model composes what it learned. 512 images a class: with 128 the demo's
RQ-Transformer overfit them. Files are real PNGs in `{root}/{class}/{class}_{i:04d}.png`, as a
user's dataset with class sub-folders would be, and `{root}.csv` lists them with their class and
caption, as a user's captioned dataset would.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_CLASSES = ("circle", "square", "triangle", "cross")
DEMO_COLOURS = {"red": (220, 50, 50), "green": (60, 200, 70), "blue": (70, 110, 240),
                "yellow": (235, 215, 60), "magenta": (215, 70, 215), "cyan": (70, 215, 225)}  # fmt: skip
UNSEEN = {("circle", "cyan"), ("square", "magenta"), ("triangle", "blue"), ("cross", "yellow")}


def demo_prompts() -> list[str]:
    """What the demo's caption model is asked for: every shape in every colour, "a large
    {colour} {shape}", shape by shape; the UNSEEN combinations never occur in training."""
    return [f"a large {colour} {shape}" for shape in DEMO_CLASSES for colour in DEMO_COLOURS]


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


def demo_image(shape: str, rng: np.random.Generator, size: int = 64,
               colours: list[str] | None = None) -> tuple[Image.Image, str]:  # fmt: skip
    """One drawing and its caption; the colour is drawn from `colours` (default: the ones
    this shape occurs in)."""
    colours = colours or [c for c in DEMO_COLOURS if (shape, c) not in UNSEEN]
    name = colours[int(rng.integers(len(colours)))]
    colour = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in DEMO_COLOURS[name])
    background = tuple(int(v) for v in rng.integers(0, 90, 3))
    image = Image.new("RGB", (size, size), background)
    r = size * rng.uniform(0.22, 0.34)
    dx, dy = rng.uniform(-0.12, 0.12, 2).tolist()
    cx, cy = size / 2 + size * dx, size / 2 + size * dy
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, colour)
    words = ["a", "small" if r < 0.28 * size else "large", name, shape]
    if abs(dx) > 0.05:
        words += ["on", "the", "left" if dx < 0 else "right"]
    if abs(dy) > 0.05:
        words += ["at", "the", "top" if dy < 0 else "bottom"]
    return image, " ".join(words)


def write_demo_dataset(root: str | os.PathLike, per_class: int = 512, size: int = 64,
                       seed: int = 0) -> list[Path]:  # fmt: skip
    """Write the dataset (skipping files already present) and return the paths, sorted."""
    root = Path(root)
    paths, rows = [], []
    for label, shape in enumerate(DEMO_CLASSES):
        rng = np.random.default_rng([seed, label])
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image, caption = demo_image(shape, rng, size)  # drawn even when present: keeps rng
            path = root / shape / f"{shape}_{i:04d}.png"
            if not path.exists():
                tmp = path.with_suffix(".tmp.png")
                image.save(tmp)
                tmp.replace(path)
            paths.append(path)
            rows.append({"path": f"{root.name}/{shape}/{path.name}", "label": shape,
                         "caption": caption})  # fmt: skip
    listing = demo_listing(root)
    if not listing.exists():
        tmp = listing.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "label", "caption"])
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(listing)
    return sorted(paths)


def demo_listing(root: str | os.PathLike) -> Path:
    """The listing beside the image folder: path (relative to it), label, caption."""
    return Path(f"{Path(root)}.csv")
