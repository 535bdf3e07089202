"""Progress of a stage's units, printed for the person watching the job."""

from __future__ import annotations

import time


class Progress:
    """One line every `every_s` seconds and at the end: units, items, rate."""

    def __init__(self, stage: str, total_units: int, every_s: float = 5.0) -> None:
        self.stage, self.total, self.every_s = stage, total_units, every_s
        self.done = self.items = 0
        self.start = self.last = time.time()

    def update(self, items: int, extra: str = "") -> None:
        self.done += 1
        self.items += items
        now = time.time()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.items / max(now - self.start, 1e-9)
            print(f"{self.stage}: {self.done}/{self.total} units, {self.items:,} items, "
                  f"{rate:,.1f} items/s{extra}", flush=True)  # fmt: skip
