"""Pieces every training loop shares: the learning-rate schedule and the metrics log."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the base learning rate: linear warmup, then cosine decay to min_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class MetricsLog:
    """Appends one JSON object per line and echoes a short line to the console."""

    def __init__(self, path: str | Path, echo: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.start = time.time()

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "elapsed_s": round(time.time() - self.start, 2), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.echo:
            shown = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in record.items()
                if not isinstance(v, list | dict)
            )
            print(shown, flush=True)
