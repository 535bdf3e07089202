"""Residual-quantizer encode: throughput and peak memory against a bare matmul + argmin.

    python bench/quantizer.py              # paper shape (N = 32768) and N = 262144
    python bench/quantizer.py --quick      # smaller N, for a fast look
    python bench/quantizer.py --device cuda

Each measurement runs in a fresh process so its peak memory is its own (RSS on CPU,
torch.cuda.max_memory_allocated on GPU). "bare" is D rounds of the full N x K fp32 distance
matmul followed by argmin, the physical floor of exact encoding; "rq fp32" is
ResidualQuantizer.encode with chunked distances; "rq bf16" computes candidate distances in
bf16 and re-ranks the best 8 per vector in fp32.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.quantizer import ResidualQuantizer

DIM, K, DEPTH = 256, 16384, 4


def synthetic(n: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A codebook with rows at D scales (as a trained RQ codebook has) and latents built from
    one row per scale plus noise: (K, C) codebook, (n, C) vectors."""
    g = torch.Generator().manual_seed(seed)
    scales = 0.5 ** (torch.arange(K) % DEPTH).float()
    codebook = torch.randn(K, DIM, generator=g) * scales[:, None]
    picks = [torch.randint(K // DEPTH, (n,), generator=g) * DEPTH + d for d in range(DEPTH)]
    z = sum(codebook[p] for p in picks) + 0.05 * torch.randn(n, DIM, generator=g)
    return codebook.to(device), z.to(device)


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _bare(codebook: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    sq = codebook.pow(2).sum(1)
    codes = []
    for _ in range(DEPTH):
        codes.append(torch.addmm(sq, z, codebook.t(), alpha=-2.0).argmin(1))
    return torch.stack(codes, 1)


def _measure(kind: str, n: int, device: str, queue: mp.Queue) -> None:
    torch.manual_seed(0)
    codebook, z = synthetic(n, device)
    quantizer = ResidualQuantizer(DIM, K, DEPTH, distance_dtype="bfloat16" if kind == "rq bf16"
                                  else "float32").to(device).eval()  # fmt: skip
    quantizer.codebooks[0] = codebook

    def run() -> torch.Tensor:
        if kind == "bare":
            return _bare(codebook, z)
        return quantizer.encode(z.view(1, n, 1, DIM)).view(n, DEPTH)

    warm = z[: min(n, 2048)]
    _bare(codebook, warm) if kind == "bare" else quantizer.encode(warm.view(1, -1, 1, DIM))
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = _peak_bytes(device) if device == "cuda" else _current_rss()
    best = float("inf")
    for _ in range(2 if n <= 65536 else 1):
        start = time.perf_counter()
        codes = run()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    peak_extra = _peak_bytes(device) - before
    exact = quantizer.encode(z[:8192].view(1, -1, 1, DIM)).view(-1, DEPTH)
    ref = ResidualQuantizer(DIM, K, DEPTH).to(device).eval()
    ref.codebooks[0] = codebook
    agreement = (exact == ref.encode(z[:8192].view(1, -1, 1, DIM)).view(-1, DEPTH)).float().mean()
    del codes
    queue.put({"seconds": best, "peak_extra": peak_extra, "agreement": agreement.item()})


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(kind: str, n: int, device: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(kind, n, device, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    paper_n = 8192 if args.quick else 32768  # paper shape: batch 64 x 8 x 8 x 8
    large_n = 65536 if args.quick else 262144
    print(f"device={args.device} threads={torch.get_num_threads()} dim={DIM} K={K} D={DEPTH}")
    print(f"{'N':>8} {'kind':<8} {'vectors/s':>12} {'vs bare':>8} {'peak MiB':>9} "
          f"{'N x K fp32 MiB':>15} {'agree':>7}")  # fmt: skip
    for n, kinds in ((paper_n, ("bare", "rq fp32", "rq bf16")), (large_n, ("rq fp32", "rq bf16"))):
        full_mib = n * K * 4 / 2**20
        bare_rate = None
        for kind in kinds:
            r = measure(kind, n, args.device)
            rate = n / r["seconds"]
            bare_rate = rate if kind == "bare" else bare_rate
            ratio = f"{rate / bare_rate:.3f}" if bare_rate else "-"
            print(f"{n:>8} {kind:<8} {rate:>12,.0f} {ratio:>8} {r['peak_extra'] / 2**20:>9.0f} "
                  f"{full_mib:>15.0f} {r['agreement']:>7.4f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
