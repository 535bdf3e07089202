"""`rqpipe clip-score`: how well a caption model's samples match their prompts, by CLIP.

The score is the paper's (and the official repository's): the mean cosine similarity between
CLIP's image and text embeddings of each sample and its prompt (ViT-B/32 in the paper: 0.26 on
CC-3M). CLIP runs through Hugging Face `transformers` (`CLIPModel`), from a folder the user
gives (e.g. a download of openai/clip-vit-base-patch32: config.json, model.safetensors,
tokenizer files); nothing is downloaded. Not open_clip: it imports torchvision at import time,
and torchvision's published wheels need a CUDA build of torch (docs/architecture.md).
Images are resized (bicubic) so that the short side is CLIP's input size, centre-cropped and
normalised with CLIP's mean and std, as CLIP's own preprocessing does.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.core.storage import Storage, join

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(path: str):
    """(model, tokenizer) from a local CLIP folder in the transformers layout."""
    from transformers import AutoTokenizer, CLIPModel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--clip {path}: not a CLIP folder (config.json, "
                                f"model.safetensors, tokenizer files), e.g. a download of "
                                f"openai/clip-vit-base-patch32")  # fmt: skip
    model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def preprocess(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size), as CLIP's preprocessing."""
    out = []
    for image in images:
        image = image.convert("RGB")
        scale = size / min(image.size)
        resized = image.resize((max(size, round(image.width * scale)),
                                max(size, round(image.height * scale))), Image.BICUBIC)  # fmt: skip
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        pixels = np.asarray(resized.crop((left, top, left + size, top + size)), np.float32) / 255
        out.append((pixels - CLIP_MEAN) / CLIP_STD)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()


@torch.no_grad()
def clip_similarities(model: Any, tokenizer: Any, images: list[Image.Image],
                      prompts: list[str]) -> torch.Tensor:  # fmt: skip
    """(N,) cosine similarity of each image with its prompt."""
    size = model.config.vision_config.image_size
    image = model.get_image_features(pixel_values=preprocess(images, size))
    max_length = model.config.text_config.max_position_embeddings
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt")  # fmt: skip
    text = model.get_text_features(**tokens)
    # transformers 5 returns the projected embeddings as the outputs' pooler_output
    image, text = (getattr(f, "pooler_output", f) for f in (image, text))
    return torch.nn.functional.cosine_similarity(image, text)  # (N,)


def clip_score(storage: Storage, samples_dir: str, clip_path: str,
               batch_size: int = 64) -> dict[str, Any]:  # fmt: skip
    """The CLIP score of a sample stage's output (its codes tables record each prompt);
    also written to SAMPLES/clip_score.json."""
    model, tokenizer = load_clip(clip_path)
    filesystem, path = storage.arrow_fs(join(samples_dir, "codes"))
    rows = pq.read_table(path, filesystem=filesystem, columns=["key", "caption"]).to_pylist()
    rows = [r for r in rows if r["caption"]]
    if not rows:
        raise ValueError(f"{samples_dir}: no sample has a prompt (a caption model's samples, "
                         f"`rqpipe sample --prompt ...`, have)")  # fmt: skip
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        images = [Image.open(io.BytesIO(storage.read_bytes(
            join(samples_dir, "images", f"{r['key']}.png")))) for r in batch]  # fmt: skip
        scores += clip_similarities(
            model, tokenizer, images, [r["caption"] for r in batch]
        ).tolist()
    per_prompt: dict[str, list[float]] = {}
    for row, score in zip(rows, scores, strict=True):
        per_prompt.setdefault(row["caption"], []).append(score)
    report = {
        "clip_score": round(float(np.mean(scores)), 4),
        "samples": len(scores),
        "clip": str(clip_path),
        "per_prompt": {p: round(float(np.mean(s)), 4) for p, s in sorted(per_prompt.items())},
    }
    storage.write_bytes(join(samples_dir, "clip_score.json"), json.dumps(report, indent=2).encode())
    return report
