"""Encode stage throughput against the bare model on the same images already in memory.

    python bench/encode.py            # 16384 demo images, tiny RQ-VAE at 32x32, batch 256

The stage runs on a local Ray instance (4 logical CPUs; one encoder actor with 2 CPUs, since
Ray sets an actor's torch threads from its CPUs and the bare loop uses both cores). "Where the
rest goes" times the stage's own pieces one at a time in this process: reading and decoding the
shards, building and writing the Parquet files.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.rqvae import RQVAE, RQVAEConfig
from pipeline.core.storage import StorageConfig
from pipeline.demo.data import write_demo_dataset
from pipeline.formats.codes_table import codes_table, to_parquet_bytes
from pipeline.formats.shard_tar import decode_shard
from pipeline.stages.encode import EncodeConfig, run_encode_stage
from pipeline.stages.shard import ShardConfig, run_shard_stage

BATCH = 256


def main() -> None:
    import ray

    work = Path(tempfile.mkdtemp(prefix="rqpipe-bench-encode-"))
    try:
        write_demo_dataset(work / "in", per_class=4096)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        run = work / "run"
        manifest = run_shard_stage(str(work / "in"), str(run), ShardConfig(
            image_size=32, samples_per_shard=512, val_fraction=0.0))  # fmt: skip
        torch.manual_seed(0)
        model = RQVAE(RQVAEConfig.preset("tiny")).eval()
        model.save_pretrained(str(run / "vae" / "model"))

        start = time.perf_counter()
        decoded = [decode_shard(str(run / "shards" / u["name"]), 32, StorageConfig())
                   for u in manifest.units]  # fmt: skip
        decode_s = time.perf_counter() - start
        images = torch.from_numpy(np.concatenate([d["images"] for d in decoded]))
        images = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        n = len(images)

        model.encode(images[:BATCH])  # warm-up
        start = time.perf_counter()
        codes = torch.cat([model.encode(images[i : i + BATCH]) for i in range(0, n, BATCH)])
        bare = n / (time.perf_counter() - start)

        start = time.perf_counter()
        offset = 0
        for d in decoded:
            rows = len(d["keys"])
            to_parquet_bytes(codes_table(d["keys"], d["labels"], d["captions"],
                                         codes[offset : offset + rows].numpy(), 256, "bench"))  # fmt: skip
            offset += rows
        write_s = time.perf_counter() - start

        config = EncodeConfig(batch_size=BATCH, cpus_per_actor=2, decode_cpus=0.5)
        start = time.perf_counter()
        run_encode_stage(str(run), config)
        stage = n / (time.perf_counter() - start)

        print(f"{n} images, tiny RQ-VAE at 32x32 -> 8x8x4, batch {BATCH}, "
              f"{torch.get_num_threads()} torch threads")  # fmt: skip
        print(f"{'method':<38} {'images/s':>9} {'ratio':>6}")
        print(f"{'bare model.encode (decoded, in memory)':<38} {bare:>9.0f} {1.0:>6.2f}")
        print(f"{'encode stage, end to end':<38} {stage:>9.0f} {stage / bare:>6.2f}")
        print(f"where the rest goes, per image, one process: decode shards "
              f"{decode_s / n * 1e6:.0f} us, tables + Parquet {write_s / n * 1e6:.0f} us, "
              f"model {1e6 / bare:.0f} us")  # fmt: skip
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
