"""The shards' file format: WebDataset tars, one sample per key ({key}.{ext} members).

The shard stage writes them; train-vae, encode and evaluate read them. Torch-free: Ray Data's
workers import it for the maps here without paying for torch.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.storage import Storage, StorageConfig
from pipeline.formats.images import center_square
from pipeline.formats.views import augmented_view, flips, swap_sides, view_rng

IMAGE_EXTENSIONS = ("png", "jpg", "webp")  # the members that hold a sample's image


def tar_bytes(files: list[tuple[str, bytes]]) -> bytes:
    """A tar of (name, bytes) that is the same bytes for the same files: fixed owners,
    modes and mtimes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def iter_tar(data: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a WebDataset tar, in archive order."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")  # WebDataset: the key ends at the first dot
            key = f"{directory}/{stem}" if directory else stem
            groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
    yield from groups.items()


def image_member(parts: dict[str, bytes]) -> bytes | None:
    """The encoded image of one sample (its members by extension), or None when it has none."""
    return next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)


def decode_shard(tar_uri: str, resolution: int, storage_config: StorageConfig, views: int = 1,
                 augment: str = "crop_flip", seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """A shard tar -> keys, views, labels, captions and (N, R, R, 3) uint8 images: for each
    sample its centre square (view 0), then `views - 1` augmented views (formats/views.py),
    a flipped view with its caption's sides swapped."""
    storage = Storage(storage_config)
    keys, numbers, labels, captions, images = [], [], [], [], []
    for key, parts in iter_tar(storage.read_bytes(tar_uri)):
        data = image_member(parts)
        if data is None:
            continue
        meta = json.loads(parts["json"]) if "json" in parts else {}
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            for view in range(views):
                caption = meta.get("caption")
                if view == 0:
                    pixels = center_square(image, resolution)
                else:
                    flipped = flips(augment, view)
                    pixels = augmented_view(image, resolution, augment, view_rng(seed, key, view),
                                            flipped)  # fmt: skip
                    caption = swap_sides(caption) if flipped else caption
                keys.append(key)
                numbers.append(view)
                labels.append(meta.get("label"))
                captions.append(caption)
                images.append(pixels)
    empty = np.zeros((0, resolution, resolution, 3), np.uint8)
    return {"keys": keys, "views": numbers, "labels": labels, "captions": captions,
            "images": np.stack(images) if images else empty}  # fmt: skip


# -- training images (train-vae's Ray Data map) ---------------------------------------------------


def random_square(image: Image.Image, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop to resolution (shards may be larger), or resize when smaller."""
    w, h = image.size
    if min(w, h) < resolution:
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
        w = h = resolution
    left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)))


AUGMENT_SEED = "augment_seed"  # a column of uniform draws in [0, 1), one per row and epoch


def decode_batch(
    batch: dict[str, Any], resolution: int, random_flip: bool
) -> dict[str, np.ndarray]:
    """Ray Data map: WebDataset rows (image bytes) -> {"image": (B, R, R, 3) uint8}. Each
    row's crop and flip come from its own draw in AUGMENT_SEED, so they are reproducible."""
    column = next(c for c in IMAGE_EXTENSIONS if c in batch)
    images = []
    for data, draw in zip(batch[column], batch[AUGMENT_SEED], strict=True):
        rng = np.random.default_rng(int(draw * 2**53))
        with Image.open(io.BytesIO(data)) as image:
            pixels = random_square(image.convert("RGB"), resolution, rng)
        if random_flip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        images.append(pixels)
    return {"image": np.ascontiguousarray(np.stack(images))}
