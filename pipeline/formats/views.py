"""Augmented views of a stored image: what the encode stage turns into extra code stacks, so
that train-ar sees a new view of each image every epoch, as the official stage 2 does.

View 0 of every image is its centre square at the model's resolution (`images.center_square`):
what the evaluate stage, validation and the reference statistics see. Views 1..N-1 are drawn by the dataset kind's
official training transform, each from a generator seeded by (seed, key, view), so the same
config gives the same views in any order, on any worker; the odd views are the mirrored ones
(`flips`: the official flips with p = 0.5 each epoch, and one view an epoch is drawn):

- `crop_flip` (ImageNet, `img_datasets/transforms.py`: Resize(256), RandomCrop(256),
  RandomHorizontalFlip): a random square of the stored image's shorter side, resized to the
  model's resolution (with `shard.resize_mode: shorter_side` the shards keep the longer side,
  along which the crop moves; a square image is only flipped), mirrored in odd views;
- `resized_crop_flip` (FFHQ: RandomResizedCrop(scale=(0.75, 1), ratio=(1, 1)), flip): a random
  square of 75-100% of the shorter side's square area, resized, mirrored in odd views;
- `dalle` (CC-3M, `txtimg_datasets/transforms.py` AugmentationDALLE + RandomCrop): the
  square of the shorter side, placed within the middle quarter of the slack, resized to a
  random size between the resolution and 9/8 of it, then a random crop. No flip.

A flipped view's caption has "left" and "right" swapped (whole words, case kept), so
augmentation never moves a side the caption names; a caption using "right" as "correct" is the
one it would make wrong: use `dalle` (no flip) for such captions.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from PIL import Image

VIEW_AUGMENTS = ("crop_flip", "resized_crop_flip", "dalle")
_SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """The generator of one view: the same (seed, key, view) draws the same view anywhere."""
    digest = hashlib.sha256(f"{seed}/{key}/{view}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def swap_sides(caption: str | None) -> str | None:
    """The caption of a horizontally flipped image: left and right swapped."""
    if not caption:
        return caption

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        return (
            other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other
        )

    return _SIDES.sub(swap, caption)


def _square(image: Image.Image, left: int, top: int, side: int, size: int) -> Image.Image:
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.Resampling.BICUBIC)


def flips(augment: str, view: int) -> bool:
    """Whether view `view` is mirrored: the odd ones, for the transforms that flip. Each epoch's
    view is then flipped half the time, as the official p = 0.5, and a square image's views
    are never two copies of one picture."""
    return augment != "dalle" and view % 2 == 1


def augmented_view(image: Image.Image, size: int, augment: str, rng: np.random.Generator,
                   flip: bool) -> np.ndarray:  # fmt: skip
    """One augmented view: (size, size, 3) uint8 RGB, mirrored when `flip`."""
    image = image.convert("RGB")
    w, h = image.size
    short = min(w, h)
    if augment == "crop_flip":  # Resize(size) then RandomCrop(size): a square of the short side
        left, top = int(rng.integers(0, w - short + 1)), int(rng.integers(0, h - short + 1))
        view = _square(image, left, top, short, size)
    elif augment == "resized_crop_flip":
        side = max(1, round(short * np.sqrt(rng.uniform(0.75, 1.0))))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        view = _square(image, left, top, side, size)
    elif augment == "dalle":
        left = int(
            rng.integers(3 * (w - short) // 8, max(3 * (w - short) // 8 + 1, 5 * (w - short) // 8))
        )
        top = int(
            rng.integers(3 * (h - short) // 8, max(3 * (h - short) // 8 + 1, 5 * (h - short) // 8))
        )
        grown = int(rng.integers(size, max(min(short, round(9 / 8 * size)), size) + 1))
        view = _square(image, left, top, short, grown)
        x, y = int(rng.integers(0, grown - size + 1)), int(rng.integers(0, grown - size + 1))
        view = view.crop((x, y, x + size, y + size))
    else:
        raise ValueError(f"augment={augment!r}: use one of {list(VIEW_AUGMENTS)}")
    pixels = np.asarray(view)
    return np.ascontiguousarray(pixels[:, ::-1]) if flip else pixels
