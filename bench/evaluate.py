"""Throughput of the evaluate stage's feature extraction: the FID Inception network on 256x256
uint8 images (random weights: the speed does not depend on them), and what the paper's
protocol costs at that rate (50,000 samples + the 1.28M ImageNet train images of the reference).

    python bench/evaluate.py --device cpu --images 32 --batch 16
    python bench/evaluate.py --device cuda --images 5000 --batch 250 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.evaluation.inception import FIDInception


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    model = FIDInception().eval().to(args.device)
    images = torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution),
                           dtype=torch.uint8, device=args.device)  # fmt: skip
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16,
                              enabled=args.dtype == "bfloat16")  # fmt: skip
    with torch.no_grad(), autocast:
        model(images)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started, done = time.perf_counter(), 0
        while done < args.images:
            model(images)
            done += args.batch
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    rate = done / (time.perf_counter() - started)
    print(
        f"FID Inception, {args.resolution}px, batch {args.batch}, {args.dtype}, {args.device}: "
        f"{rate:,.1f} images/s"
    )
    for what, count in (("50,000 samples", 50_000), ("+ ImageNet train reference", 1_331_167)):
        print(f"  {what}: {count / rate / 60:,.1f} min on one device")


if __name__ == "__main__":
    main()
