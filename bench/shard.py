"""Shard stage throughput: the stage (Ray Data) against a single-process loop doing the same work.

    python bench/shard.py               # 960 photo-sized JPEGs -> 256px JPEG shards

The single-process baseline lists the folder, assigns every file its shard and calls the
stage's own `write_shard_group` on each shard's rows, one shard after another: the same
reads, decode + resize + encode and tar write, without Ray. The stage is then run with shard
tasks of 1 and 0.5 CPU (Ray started once, with the machine's CPUs; workers warmed up by a
small run first). Figures are images/s. With `--s3`, the same images are also read from moto's
S3 server behind bench/s3_meter.py, 30 ms a request as from EC2 (one GET an image, 16 in
flight a task), and written back there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stages.shard import ShardConfig, run_shard_stage
from pipeline.stages.shard.listing import _census_part, _list_folder, assign_units
from pipeline.stages.shard.writer import write_shard_group


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


def s3_rate(images: Path, config: ShardConfig, count: int) -> float:
    """images/s of the stage from S3 to S3: moto behind the meter, 30 ms a request."""
    import boto3
    from scale import Services  # bench/scale.py, beside this file

    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench-secret"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        os.environ.setdefault(key, value)
    services = Services(30.0, images.parent / "moto.log")
    try:
        client = boto3.client("s3", endpoint_url=services.direct)
        client.create_bucket(Bucket="bench")
        for path in sorted(images.rglob("*.jpg")):
            client.upload_file(str(path), "bench", f"in/{path.relative_to(images).as_posix()}")
        config.storage.endpoint_url = services.url
        start = time.perf_counter()
        run_shard_stage("s3://bench/in", "s3://bench/run", config)
        return count / (time.perf_counter() - start)
    finally:
        config.storage.endpoint_url = None
        services.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--per-shard", type=int, default=20)
    parser.add_argument("--s3", action="store_true", help="also from and to S3 (moto, 30 ms)")
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="rqpipe-bench-shard-"))
    try:
        make_inputs(work / "in", args.images)
        config = ShardConfig(image_size=256, encoding="jpg", quality=95,
                             samples_per_shard=args.per_shard, val_fraction=0.0)  # fmt: skip
        rows = pa.concat_tables([_list_folder(config.storage, str(work / "in"), str(folder))
                                 for folder in sorted((work / "in").iterdir())])  # fmt: skip
        part = _census_part(rows, config.val_fraction).to_pylist()[0]
        census = {"kind": "folder", "counts": {"train": part["train"], "val": part["val"]},
                  "label_names": json.loads(part["labels"]), "per_tar": {}}  # fmt: skip
        assigned = assign_units(rows, census, config.val_fraction, config.samples_per_shard)
        units = sorted(set(assigned.column("unit").to_pylist()))

        start = time.perf_counter()
        for unit in units:
            group = assigned.filter(pc.equal(assigned.column("unit"), unit))
            write_shard_group(group, config, str(work / "loop"), "bench")
        loop_rate = len(rows) / (time.perf_counter() - start)

        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        make_inputs(work / "warm", 8)
        run_shard_stage(str(work / "warm"), str(work / "warm-run"), config)
        cpus = int(ray.cluster_resources()["CPU"])
        print(f"{len(rows)} images of 640x480 -> 256px jpg, {len(units)} shards, "
              f"{cpus} CPUs")  # fmt: skip
        print(f"{'method':<32} {'images/s':>9} {'vs loop':>8}")
        print(f"{'single-process loop':<32} {loop_rate:>9.1f} {1.0:>8.2f}")
        for cpus_per_task in (1.0, 0.5):
            config.cpus_per_task = cpus_per_task
            run_dir = work / f"ray-{cpus_per_task}"
            start = time.perf_counter()
            run_shard_stage(str(work / "in"), str(run_dir), config)
            rate = len(rows) / (time.perf_counter() - start)
            label = f"stage, shard tasks of {cpus_per_task} CPU"
            print(f"{label:<32} {rate:>9.1f} {rate / loop_rate:>8.2f}", flush=True)
        if args.s3:
            rate = s3_rate(work / "in", config, len(rows))
            label = f"stage on S3, tasks of {config.cpus_per_task} CPU"
            print(f"{label:<32} {rate:>9.1f} {rate / loop_rate:>8.2f}", flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
