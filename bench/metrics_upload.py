"""Bytes a training stage uploads for its metrics log on an object store, by run length.

Before the change: metrics.jsonl was rewritten whole at every log, so a run of N logs uploaded
about N^2 / 2 lines. Now: one part file per checkpoint with the records since the last one,
N lines in all. Measured on fsspec's in-memory filesystem (an object store: nothing can be
appended) through the same `Storage.write_bytes` every stage uses.

    .venv/bin/python bench/metrics_upload.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.storage import Storage
from pipeline.core.training import RunMetrics, read_metrics


class CountingStorage(Storage):
    """Counts the bytes of the metrics log's uploads (curves.png aside: it is a new artifact)."""

    def __init__(self) -> None:
        super().__init__()
        self.uploaded = 0

    def write_bytes(self, uri: str, data: bytes) -> None:
        if "/metrics" in uri:
            self.uploaded += len(data)
        super().write_bytes(uri, data)


def record(step: int) -> dict:
    terms = {f"loss_d{d}": 1.0 / step for d in range(1, 5)}
    return {"step": step, "loss": 1.0 / step, "lr": 1e-4, **terms, "val_loss": 2.0 / step}


def main() -> None:
    print("| steps | logs (every 100) | checkpoints (every 5000) | rewritten whole (before) "
          "| parts per checkpoint (now) | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for steps in (10_000, 100_000, 250_000):
        line = len(json.dumps(record(1))) + 1
        logs = steps // 100
        before = line * logs * (logs + 1) // 2  # the whole file at every log
        storage = CountingStorage()
        uri = f"memory://bench-{steps}/ar"
        metrics = RunMetrics(storage, uri, "bench")
        for step in range(100, steps + 1, 100):
            # What write() buffers on an object store (without its console line).
            metrics.pending.append(json.dumps(record(step)) + "\n")
            if step % 5000 == 0:
                metrics.checkpoint(step)
        assert len(read_metrics(storage, uri)) == logs
        now = storage.uploaded
        print(
            f"| {steps:,} | {logs:,} | {steps // 5000} | {before / 1e6:,.1f} MB "
            f"| {now / 1e6:,.2f} MB | {before / now:,.0f}x |"
        )


if __name__ == "__main__":
    main()
