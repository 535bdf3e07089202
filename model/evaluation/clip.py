"""CLIP through Hugging Face `transformers` (`CLIPModel`), for the CLIP score: the cosine
similarity of an image's and its caption's embeddings.

From a folder the user gives (e.g. a download of openai/clip-vit-base-patch32: config.json,
model.safetensors, tokenizer files); nothing is downloaded. Not open_clip: it imports
torchvision at import time, and torchvision's published wheels need a CUDA build of torch
(docs/architecture.md). Images are resized (bicubic) so that the short side is CLIP's input
size, centre-cropped and normalised with CLIP's mean and std, as CLIP's own preprocessing does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(path: str):
    """(model, tokenizer) from a local CLIP folder in the transformers layout."""
    from transformers import AutoTokenizer, CLIPModel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"CLIP folder {path}: not a CLIP folder (config.json, "
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
                      prompts: list[str], device: str = "cpu") -> torch.Tensor:  # fmt: skip
    """(N,) cosine similarity of each image with its prompt."""
    size = model.config.vision_config.image_size
    image = model.get_image_features(pixel_values=preprocess(images, size).to(device))
    max_length = model.config.text_config.max_position_embeddings
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt")  # fmt: skip
    text = model.get_text_features(**tokens.to(device))
    # transformers 5 returns the projected embeddings as the outputs' pooler_output
    image, text = (getattr(f, "pooler_output", f) for f in (image, text))
    return torch.nn.functional.cosine_similarity(image, text)  # (N,)
