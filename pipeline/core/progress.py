"""Progress of a stage's units (shards, tables, chunks), for the person watching the job, and
a training worker's wait for data when it stalls (`BatchWait`).

On a terminal: a tqdm bar over the items (images, samples) with rate and ETA. In a log (stdout
is not a TTY: `ray job submit`, CI, `| tee`): one plain line every `every_s` seconds and at the
end, with the percentage and the ETA, so a log never fills with carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(self, stage: str, total_units: int, total_items: int, unit: str = "images",
                 every_s: float = 10.0, stream: TextIO | None = None) -> None:  # fmt: skip
        self.stage, self.total, self.total_items, self.unit = stage, total_units, total_items, unit
        self.every_s, self.stream = every_s, stream or sys.stdout
        self.done = self.items = 0
        self.start = self.last = time.time()
        self.bar = None
        if self.stream.isatty() and total_units > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total_items, desc=stage, unit=f" {unit}", file=self.stream,
                            dynamic_ncols=True, smoothing=0.1)  # fmt: skip

    def update(self, items: int, extra: str = "") -> None:
        """One unit finished with `items` items; `extra` is shown after the figures."""
        self.done += 1
        self.items += items
        if self.bar is not None:
            self.bar.update(items)
            self.bar.set_postfix_str(f"{self.done}/{self.total} units{extra}", refresh=False)
            if self.done == self.total:
                self.bar.close()
            return
        now = time.time()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            rate = self.items / elapsed
            fraction = self.items / self.total_items if self.total_items else 1.0
            eta = elapsed * (1 - fraction) / fraction if 0 < fraction < 1 else 0.0
            print(f"{self.stage}: {self.done}/{self.total} units, {self.items:,}/"
                  f"{self.total_items:,} {self.unit} ({100 * fraction:.0f}%), {rate:,.1f} "
                  f"{self.unit}/s, elapsed {_duration(elapsed)}, ETA {_duration(eta)}{extra}",
                  file=self.stream, flush=True)  # fmt: skip


class BatchWait:
    """Says so, once a wait, when no training batch has come for `after` seconds, and why it
    may be: what the cluster has free. A data pipeline left no CPU (the Train workers holding
    them all) waits forever; this makes it loud. The step loop calls `fetching()` before it
    asks for a batch and `got()` once it has one; a daemon thread watches."""

    def __init__(self, rank: int, after: float) -> None:
        import threading

        self.rank, self.after = rank, after
        self.since: float | None = None  # when the current wait began; None: not waiting
        self.warned = False
        self.stopped = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def fetching(self) -> float:
        """A wait for a batch begins (-> its start)."""
        self.since, self.warned = time.time(), False
        return self.since

    def got(self) -> None:
        self.since = None

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(min(self.after, 5.0)):
            since = self.since
            if since is None or self.warned or time.time() - since < self.after:
                continue
            self.warned = True
            # not print(): Ray Train tees a worker's print to the driver twice (RunMetrics)
            sys.__stdout__.write(f"worker {self.rank}: no training batch for "
                                 f"{time.time() - since:.0f} s. {free_resources()} Ray Data's "
                                 f"read tasks need a CPU each: if the Train workers hold them "
                                 f"all, lower cpus_per_worker or num_workers (docs/cluster.md); "
                                 f"a slow object store also shows here.\n")  # fmt: skip
            sys.__stdout__.flush()


def free_resources() -> str:
    """What the connected Ray cluster has free, in a sentence."""
    try:
        import ray

        free, total = ray.available_resources(), ray.cluster_resources()
    except Exception as error:  # the watch must never fail the run
        return f"(the cluster's resources could not be read: {type(error).__name__})"
    shown = [f"{k} {free.get(k, 0):g} of {total[k]:g}" for k in ("CPU", "GPU") if k in total]
    return f"The cluster has {', '.join(shown) or 'no CPU or GPU'} free."
