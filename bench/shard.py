"""Shard stage throughput: Ray tasks against a single-process loop doing the same work.

    python bench/shard.py               # 960 photo-sized JPEGs -> 256px JPEG shards

The single-process baseline calls the stage's own `write_shard` on the same plan, one shard
after another: the same decode + resize + encode + tar write, without Ray. The stage is then
run with 1, 2 and 4 shard tasks in flight (Ray started once, with the machine's CPUs; workers
warmed up by a small run first). Figures are images/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.storage import Storage
from pipeline.stages.shard import (
    ShardConfig,
    listing_digest,
    plan_sources,
    plan_units,
    run_shard_stage,
    write_shard,
)


def photo(rng: np.random.Generator, width: int = 640, height: int = 480) -> Image.Image:
    """Smooth gradients and shapes: compresses like a photograph, unlike noise."""
    y, x = np.mgrid[0:height, 0:width]
    channels = [np.sin(x / rng.uniform(20, 90) + rng.uniform(0, 6)) * 60 + 120
                + np.cos(y / rng.uniform(20, 90)) * 50 for _ in range(3)]  # fmt: skip
    image = Image.fromarray(np.stack(channels, -1).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 50), rng.integers(0, height - 50)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse([x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)], fill=colour)
    return image


def make_inputs(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(rng).save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--per-shard", type=int, default=20)
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="rqpipe-bench-shard-"))
    try:
        make_inputs(work / "in", args.images)
        config = ShardConfig(image_size=256, encoding="jpg", quality=95,
                             samples_per_shard=args.per_shard, val_fraction=0.0)  # fmt: skip
        storage = Storage()
        sources, _ = plan_sources(storage, str(work / "in"))
        units = plan_units(sources, config)
        fp = listing_digest(sources)

        start = time.perf_counter()
        for unit in units:
            write_shard(unit, config, str(work / "loop"), fp)
        loop_rate = len(sources) / (time.perf_counter() - start)

        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        make_inputs(work / "warm", 8)
        run_shard_stage(str(work / "warm"), str(work / "warm-run"), config)
        cpus = int(ray.cluster_resources()["CPU"])
        print(f"{len(sources)} images of 640x480 -> 256px jpg, {len(units)} shards, "
              f"{cpus} CPUs")  # fmt: skip
        print(f"{'method':<28} {'images/s':>9} {'vs loop':>8}")
        print(f"{'single-process loop':<28} {loop_rate:>9.1f} {1.0:>8.2f}")
        for in_flight, cpus_per_task in ((1, 1.0), (2, 1.0), (4, 0.5)):
            config.max_in_flight, config.cpus_per_task = in_flight, cpus_per_task
            run_dir = work / f"ray-{in_flight}"
            start = time.perf_counter()
            run_shard_stage(str(work / "in"), str(run_dir), config)
            rate = len(sources) / (time.perf_counter() - start)
            label = f"ray stage, {in_flight} task(s) in flight"
            print(f"{label:<28} {rate:>9.1f} {rate / loop_rate:>8.2f}", flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
