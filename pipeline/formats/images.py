"""Images between their forms: file bytes -> a clean RGB image (or a reason why not), pixels ->
model tensors, and tensors -> the PNG grids people look at.

Decoding done right: EXIF orientation applied; CMYK, palette, LA, 16-bit and grayscale
converted to RGB; alpha composited on white; animated images take their first frame;
decompression bombs rejected from the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.weights.fileio import write_bytes_atomic

if TYPE_CHECKING:  # torch is imported where tensors are made: the shard workers move bytes
    import torch

RESIZE_MODES = ("center_crop", "shorter_side", "pad", "none")
# shorter_side keeps the aspect ratio up to this (longer / shorter); a longer side beyond it is
# centre-cropped, so a panorama cannot multiply a shard's size.
MAX_ASPECT = 2.0
ENCODINGS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


class Reject(Exception):
    """An input that cannot become a sample; str() is the reason recorded in rejects.parquet."""


@dataclass
class Decoded:
    image: Image.Image  # RGB, resized
    original_size: tuple[int, int]  # (width, height) after EXIF orientation


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray((pixels / peak * 255).clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((pixels.clip(0, 1) * 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGB


def _resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    if mode == "none":
        return image
    w, h = image.size
    if mode == "center_crop":
        scale = size / min(w, h)
        rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (rw - size) // 2, (rh - size) // 2
        return image.crop((left, top, left + size, top + size))
    if (
        mode == "shorter_side"
    ):  # the official Resize(size): random crops then move along the long side
        scale = size / min(w, h)
        rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        cw, ch = min(rw, round(MAX_ASPECT * size)), min(rh, round(MAX_ASPECT * size))
        left, top = (rw - cw) // 2, (rh - ch) // 2
        return image.crop((left, top, left + cw, top + ch)) if (cw, ch) != (rw, rh) else image
    if mode == "pad":
        scale = size / max(w, h)
        rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
        image = image.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(image, ((size - rw) // 2, (size - rh) // 2))
        return canvas
    raise ValueError(f"resize_mode={mode!r}: use one of {RESIZE_MODES}")


def decode_image(
    data: bytes, size: int, resize_mode: str, min_size: int = 0, max_pixels: int = 100_000_000
) -> Decoded:
    if not data:
        raise Reject("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size  # header only: nothing decoded yet
            if w * h > max_pixels:
                raise Reject(f"decompression bomb: {w}x{h} exceeds max_pixels={max_pixels}")
            image.seek(0)  # animated: the first frame
            if image.format == "JPEG" and resize_mode != "none":
                # libjpeg decodes at 1/2, 1/4 or 1/8 scale for free, never below the target
                fit = min if resize_mode in ("center_crop", "shorter_side") else max
                scale = size / fit(w, h)
                image.draft(image.mode, (math.ceil(w * scale), math.ceil(h * scale)))
            image.load()
            image = ImageOps.exif_transpose(image)
    except Reject:
        raise
    except UnidentifiedImageError:
        raise Reject("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Reject(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Reject(f"corrupt or truncated image: {e}") from None
    original = image.size
    if min(original) < min_size:
        raise Reject(f"too small: {original[0]}x{original[1]} < min_size={min_size}")
    return Decoded(_resize(_to_rgb(image), size, resize_mode), original)


def center_square(image: Image.Image, size: int) -> np.ndarray:
    """The centred square of `image`, resized to size x size: (size, size, 3) uint8 RGB."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image.convert("RGB"))


def encode_image(image: Image.Image, encoding: str, quality: int) -> bytes:
    """Deterministic bytes for the same pixels (no timestamps, fixed settings)."""
    buffer = io.BytesIO()
    if encoding == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif encoding in ENCODINGS:
        image.save(buffer, format=ENCODINGS[encoding], quality=quality)
    else:
        raise ValueError(f"encoding={encoding!r}: use one of {sorted(ENCODINGS)}")
    return buffer.getvalue()


# -- tensors ------------------------------------------------------------------------------------


def to_model_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], the models' input range."""
    import torch

    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    import torch

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


def titled(image: Image.Image, title: str, width_chars: int | None = None) -> Image.Image:
    """The image under a white bar holding `title` (wrapped), e.g. a sample grid's prompt."""
    import textwrap

    from PIL import ImageDraw

    chars = width_chars or max(16, image.width // 7)
    lines = textwrap.wrap(title, chars) or [""]
    bar = 6 + 12 * len(lines)
    canvas = Image.new("RGB", (image.width, image.height + bar), (255, 255, 255))
    canvas.paste(image, (0, bar))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 3 + 12 * i), line, fill=(0, 0, 0))  # PIL's default bitmap font
    return canvas
