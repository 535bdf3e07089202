"""Test inputs: good images in class folders and every kind of bad input the shard stage must
survive. Each entry says whether it should become a sample and, if not, the reason's gist."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored 40x20, left half red, EXIF orientation 6: upright it is 20x40, red on top."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)


def bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels."""
    data = bytearray(_save(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = bytearray(data[16:29])  # width, height, depth, colour, ...
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 200, 0), (200, 0, 0))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def palette_with_transparency() -> bytes:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 10, 20, 200] + [0] * 762)
    image.paste(1, (0, 0, 8, 16))  # left half: colour 1, right half: colour 0 (transparent)
    return _save(image, "PNG", transparency=0)


def good_image(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def corpus() -> dict[str, tuple[bytes, str | None]]:
    """relative path -> (bytes, None if it should be accepted else a word of the reason)."""
    jpeg = _save(good_image(99, (128, 128)), "JPEG", quality=90)
    entries: dict[str, tuple[bytes, str | None]] = {
        "cats/cat 1.png": (_save(good_image(1), "PNG"), None),
        "cats/chat été.jpg": (_save(good_image(2), "JPEG"), None),
        "dogs/dog-1.webp": (_save(good_image(3), "WEBP"), None),
        "dogs/rotated.jpg": (exif_rotated_jpeg(), None),
        "dogs/cmyk.jpg": (_save(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"), None),
        "dogs/sixteen.png": (
            _save(Image.fromarray(np.full((20, 20), 65535, np.uint16)), "PNG"),
            None,
        ),
        "dogs/palette.png": (palette_with_transparency(), None),
        "dogs/gray-alpha.png": (_save(Image.new("LA", (20, 20), (0, 0)), "PNG"), None),
        "dogs/animated.gif": (animated_gif(), None),
        "cats/empty.jpg": (b"", "empty"),
        "cats/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "cats/noise.png": (os.urandom(3000), "not an image"),
        "cats/bomb.png": (bomb_png(), "decompression bomb"),
        "dogs/notes.txt": (b"not an image at all\n", "not an image"),
    }
    return entries


def write_corpus(root: Path) -> dict[str, tuple[bytes, str | None]]:
    entries = corpus()
    for rel, (data, _) in entries.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return entries
