"""Encode stage throughput against the bare model on the same images already in memory.

    python bench/encode.py            # 16384 demo images, tiny RQ-VAE at 32x32, batch 256
    python bench/encode.py --device cuda --preset imagenet256-8x8x4 --size 256 --per-class 2048 \
        --batch 128 --dtype bfloat16  # the paper's RQ-VAE (random weights) on a GPU node

The stage runs on a local Ray instance (on a CPU: 4 logical CPUs, one encoder actor with 2,
since Ray sets an actor's torch threads from its CPUs and the bare loop uses both cores; on a
GPU: one encoder actor with the GPU, decode tasks on the node's cores). The bare loop does what
the actor does to a batch: uint8 pixels to the device, encoder (under bf16 autocast when asked),
quantizer, codes back to the host. "Where the rest goes" times the stage's own pieces one at a
time in this process: reading and decoding the shards, building and writing the Parquet files.
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.rqvae import RQVAE, RQVAEConfig
from pipeline.core.storage import StorageConfig
from pipeline.demo.data import write_demo_dataset
from pipeline.formats.codes_table import codes_table, to_parquet_bytes
from pipeline.formats.shard_tar import decode_shard
from pipeline.stages.encode import EncodeConfig, run_encode_stage
from pipeline.stages.shard import ShardConfig, run_shard_stage


def bare_encode(model: RQVAE, pixels: np.ndarray, args: argparse.Namespace) -> torch.Tensor:
    """(N, R, R, 3) uint8 -> (N, h, w, D) codes on the host, batch by batch as the actor."""
    codes = []
    with torch.no_grad():
        for start in range(0, len(pixels), args.batch):
            x = torch.tensor(pixels[start : start + args.batch], device=args.device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, R, R)
            with torch.autocast(args.device, torch.bfloat16, enabled=args.dtype == "bfloat16"):
                z = model.encode_latents(x).float()
            codes.append(model.quantizer.encode(z).cpu())
    return torch.cat(codes)


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    gpu = args.device == "cuda"

    work = Path(tempfile.mkdtemp(prefix="rqpipe-bench-encode-"))
    try:
        write_demo_dataset(work / "in", per_class=args.per_class, size=args.size)
        cpus = os.cpu_count() if gpu else 4
        ray.init(address="local", num_cpus=cpus, num_gpus=int(gpu), include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
        run = work / "run"
        manifest = run_shard_stage(str(work / "in"), str(run), ShardConfig(
            image_size=args.size, samples_per_shard=512, val_fraction=0.0))  # fmt: skip
        torch.manual_seed(0)
        model = RQVAE(RQVAEConfig.preset(args.preset, resolution=args.size)).eval()
        model.save_pretrained(str(run / "vae" / "model"))
        model.to(args.device)
        if args.dtype == "bfloat16":
            model.quantizer.distance_dtype = "bfloat16"  # as the actor

        start = time.perf_counter()  # one shard in this process: the per-image decode cost
        decode_shard(str(run / "shards" / manifest.units[0]["name"]), args.size, StorageConfig())
        decode_per_image = (time.perf_counter() - start) / manifest.units[0]["rows"]
        decode = ray.remote(decode_shard)  # all of them, in parallel: the bare loop's input
        decoded = ray.get([decode.remote(str(run / "shards" / u["name"]), args.size,
                                         StorageConfig()) for u in manifest.units])  # fmt: skip
        pixels = np.concatenate([d["images"] for d in decoded])  # (N, R, R, 3) uint8
        n = len(pixels)

        bare_encode(model, pixels[: args.batch], args)  # warm-up
        start = time.perf_counter()
        codes = bare_encode(model, pixels, args)
        bare = n / (time.perf_counter() - start)
        book = model.config.codebook_size

        start = time.perf_counter()
        offset = 0
        for d in decoded:
            rows = len(d["keys"])
            to_parquet_bytes(codes_table(d["keys"], d["labels"], d["captions"],
                                         codes[offset : offset + rows].numpy(), book, "bench"))  # fmt: skip
            offset += rows
        write_s = time.perf_counter() - start

        config = EncodeConfig(batch_size=args.batch, cpus_per_actor=2, decode_cpus=0.5,
                              gpus_per_actor=int(gpu), dtype=args.dtype)  # fmt: skip
        start = time.perf_counter()
        run_encode_stage(str(run), config)
        stage = n / (time.perf_counter() - start)

        shape = "x".join(map(str, model.config.code_shape))
        print(f"{n} images, {args.preset} RQ-VAE at {args.size}x{args.size} -> {shape}, batch "
              f"{args.batch}, {args.device} {args.dtype}, {torch.get_num_threads()} torch "
              f"threads, {cpus} Ray CPUs")  # fmt: skip
        print(f"{'method':<38} {'images/s':>9} {'ratio':>6}")
        print(f"{'bare model.encode (decoded, in memory)':<38} {bare:>9.0f} {1.0:>6.2f}")
        print(f"{'encode stage, end to end':<38} {stage:>9.0f} {stage / bare:>6.2f}")
        print(f"where the rest goes, per image, one process: decode shards "
              f"{decode_per_image * 1e6:.0f} us, tables + Parquet {write_s / n * 1e6:.0f} us, "
              f"model {1e6 / bare:.0f} us")  # fmt: skip
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
