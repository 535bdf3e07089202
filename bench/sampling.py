"""RQ-Transformer (8x8x4) sampling against a flat AR transformer (16x16x1), as in the paper's
VQ-GAN comparison: same width, same number of layers, same parameter count.

    python bench/sampling.py                    # CPU, batches 32 and 128
    python bench/sampling.py --device cuda --width 1536 --batches 100 200 500 --dtype bfloat16

Both models sample with KV caches; the uncached samplers (a full forward per token) are
measured too, at a small batch. The RQ-Transformer also samples with static caches (fixed-shape
steps, recorded as CUDA graphs on a GPU: `generate(static=True)`), with the fraction of codes
equal to the growing caches' for the same seed. Figures are samples/s, best of --repeats.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.rqtransformer import RQTransformer, RQTransformerConfig


def build(shape: list[int], spatial: int, depth: int, args: argparse.Namespace) -> RQTransformer:
    torch.manual_seed(0)
    cfg = RQTransformerConfig(code_shape=shape, codebook_size=args.codebook_size, width=args.width,
                              heads=args.heads, spatial_layers=spatial, depth_layers=depth,
                              num_classes=10)  # fmt: skip
    with torch.device(args.device):  # built in place: a 1.4B model is slow to init on a CPU
        model = RQTransformer(cfg, torch.randn(args.codebook_size, 256))
    return model.to(dtype=getattr(torch, args.dtype)).eval()


def samples_per_s(model: RQTransformer, batch: int, cached: bool, args,
                  static: bool = False) -> tuple[float, torch.Tensor]:  # fmt: skip
    """-> (samples/s, best of repeats; the codes of the last repeat)."""
    labels = torch.arange(batch, device=args.device) % 10
    best = float("inf")
    for _ in range(args.repeats):
        generator = torch.Generator(device=args.device).manual_seed(0)
        start = time.perf_counter()
        codes = model.generate(labels=labels, generator=generator, use_cache=cached,
                               static=static)  # fmt: skip
        if args.device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return batch / best, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--spatial-layers", type=int, default=12)
    parser.add_argument("--depth-layers", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--uncached-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    layers = args.spatial_layers + args.depth_layers
    rq = build([8, 8, 4], args.spatial_layers, args.depth_layers, args)
    flat = build([16, 16, 1], layers, 0, args)
    rq_steps = 64 * args.spatial_layers + 256 * args.depth_layers
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"width={args.width} K={args.codebook_size}")  # fmt: skip
    print(f"rq   8x8x4   : {args.spatial_layers} spatial + {args.depth_layers} depth layers, "
          f"{rq.num_parameters() / 1e6:.1f}M params, {rq_steps} layer-steps/sample")  # fmt: skip
    print(f"flat 16x16x1 : {layers} layers, {flat.num_parameters() / 1e6:.1f}M params, "
          f"{256 * layers} layer-steps/sample (ratio {256 * layers / rq_steps:.2f})")  # fmt: skip
    print(f"{'batch':>6} {'sampler':<10} {'rq samples/s':>13} {'flat samples/s':>15} "
          f"{'rq/flat':>8} {'rq static samples/s':>20} {'static/growing':>15} "
          f"{'same codes':>11}")  # fmt: skip
    for batch in args.batches:
        (r, codes), (f, _) = samples_per_s(rq, batch, True, args), samples_per_s(flat, batch, True, args)  # fmt: skip
        rs, static_codes = samples_per_s(rq, batch, True, args, static=True)
        same = (codes == static_codes).float().mean().item()
        print(f"{batch:>6} {'cached':<10} {r:>13.2f} {f:>15.2f} {r / f:>8.2f} {rs:>20.2f} "
              f"{rs / r:>15.2f} {same:>11.1%}", flush=True)  # fmt: skip
    b = args.uncached_batch
    args.repeats = 1
    (r, _), (f, _) = samples_per_s(rq, b, False, args), samples_per_s(flat, b, False, args)
    rc, _ = samples_per_s(rq, b, True, args)
    print(f"{b:>6} {'uncached':<10} {r:>13.3f} {f:>15.3f} {r / f:>8.2f}")
    print(f"rq cached vs uncached at batch {b}: {rc / r:.1f}x")


if __name__ == "__main__":
    main()
