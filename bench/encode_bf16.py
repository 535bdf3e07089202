"""bf16 against fp32 encoding on a *trained* RQ-VAE: code agreement and throughput, side by side
in one process (the encode stage's `dtype: bfloat16` path: encoder under bf16 autocast, bf16
candidate distances with the exact fp32 re-rank).

    python bench/encode_bf16.py runs/demo            # the demo's RQ-VAE on its own shards
    python bench/encode_bf16.py RUN --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.quantizer import cpu_has_native_bf16
from model.rqvae import RQVAE
from pipeline.core.storage import StorageConfig
from pipeline.formats.shard_tar import decode_shard


def encode(model: RQVAE, images: torch.Tensor, bf16: bool, batch: int,
           bf16_distances: bool | None = None) -> tuple[torch.Tensor, float]:  # fmt: skip
    """Codes and images/s; `bf16` for the encoder, `bf16_distances` (default: the same) for
    the quantizer's candidate distances."""
    bf16_distances = bf16 if bf16_distances is None else bf16_distances
    model.quantizer.distance_dtype = "bfloat16" if bf16_distances else "float32"
    codes, started = [], time.perf_counter()
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            z = model.encode_latents(x).float()
        codes.append(model.quantizer.encode(z))
    if images.is_cuda:
        torch.cuda.synchronize()
    return torch.cat(codes), len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shards", type=int, default=8)
    args = parser.parse_args()
    run = Path(args.run_dir)
    model = RQVAE.from_pretrained(str(run / "vae" / "model")).to(args.device).eval()
    resolution = model.config.resolution
    tars = sorted((run / "shards").glob("*.tar"))[: args.shards]
    pixels = np.concatenate([decode_shard(str(t), resolution, StorageConfig())["images"]
                             for t in tars])  # fmt: skip
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().to(args.device) / 127.5 - 1
    encode(model, images[: args.batch], False, args.batch)  # warm-up both paths
    encode(model, images[: args.batch], True, args.batch)
    rates = {False: [], True: []}
    for _ in range(3):  # interleaved: the machine's load hits both alike
        for bf16 in (False, True):
            codes, rate = encode(model, images, bf16, args.batch)
            rates[bf16].append(rate)
            if bf16:
                fast = codes
            else:
                exact = codes
    same = exact == fast  # (N, h, w, D)
    distances_only = encode(model, images, False, args.batch, bf16_distances=True)[0] == exact
    print(f"{len(images)} images, {args.device}, native bf16 on this CPU: {cpu_has_native_bf16()}")
    print(
        f"  code agreement bf16 vs fp32: {same.float().mean():.4f} of codes; whole stacks "
        f"{same.all(-1).float().mean():.4f}; per depth "
        f"{[round(v, 4) for v in same.float().mean((0, 1, 2)).tolist()]}"
    )
    print(
        f"  of which bf16 distances alone (fp32 encoder): {distances_only.float().mean():.4f} "
        f"of codes"
    )
    fp32, bf16 = np.median(rates[False]), np.median(rates[True])
    print(
        f"  throughput: fp32 {fp32:,.0f} images/s, bf16 {bf16:,.0f} images/s ({bf16 / fp32:.2f}x)"
    )


if __name__ == "__main__":
    main()
