"""`rqpipe clip-score`: how well a caption model's samples match their prompts, by CLIP.

The score is the paper's (and the official repository's): the mean cosine similarity between
CLIP's image and text embeddings of each sample and its prompt (ViT-B/32 in the paper: 0.26 on
CC-3M), computed by model/evaluation/clip.py with a CLIP folder the user gives. The evaluate stage reports
the same figure with `evaluate.clip=FOLDER`.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from model.evaluation.clip import clip_similarities, load_clip
from pipeline.core.storage import Storage, join


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
