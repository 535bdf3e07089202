"""Our KV-cached sampler against the official `RQTransformer.sample`, same sizes, same process.

The sizes a new user tries first on a CPU: width 256, 8 heads, 4 spatial + 2 depth
layers, K = 512, 8x8x4 codes, 10 classes, batch 32, both with their KV caches, full-vocabulary
sampling at temperature 1. Both models get random weights of the same shapes (parameter counts
printed). Then a profile of ours: where the time of one `generate` goes.

    git clone https://github.com/kakaobrain/rq-vae-transformer /tmp/official   # not rqpipe's
    pip install --target /tmp/scratch-pkgs --no-deps omegaconf antlr4-python3-runtime==4.9.3
    PYTHONPATH=/tmp/scratch-pkgs .venv/bin/python bench/sampling_official.py \
        --official-repo /tmp/official [--threads 2] [--profile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from official_parity import ARCH_DEFAULTS, BLOCK_DEFAULTS, official_modules  # noqa: E402

from model.rqtransformer import RQTransformer, RQTransformerConfig  # noqa: E402


def official_model(OfficialAR, args):
    from omegaconf import OmegaConf

    block = {**BLOCK_DEFAULTS, "embed_dim": args.width, "n_head": args.heads, "resid_pdrop": 0.0}
    arch = {**ARCH_DEFAULTS, "type": "rq-transformer", "block_size": [8, 8, 4],
            "vocab_size": args.codebook_size, "embed_dim": args.width,
            "vocab_size_cond": 10, "block_size_cond": 1,
            "body": {"n_layer": args.spatial_layers, "block": block},
            "head": {"n_layer": args.depth_layers, "block": block}}  # fmt: skip
    torch.manual_seed(0)
    return OfficialAR(OmegaConf.create(arch)).eval()


def our_model(args) -> RQTransformer:
    config = RQTransformerConfig(code_shape=[8, 8, 4], codebook_size=args.codebook_size,
                                 width=args.width, heads=args.heads,
                                 spatial_layers=args.spatial_layers,
                                 depth_layers=args.depth_layers, num_classes=10)  # fmt: skip
    torch.manual_seed(0)
    return RQTransformer(config, torch.randn(args.codebook_size, 64)).eval()


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official-repo", type=Path, required=True)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--spatial-layers", type=int, default=4)
    parser.add_argument("--depth-layers", type=int, default=2)
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    _, OfficialAR = official_modules(args.official_repo)
    theirs, ours = official_model(OfficialAR, args), our_model(args)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"parameters: official {count(theirs) / 1e6:.2f}M, ours {count(ours) / 1e6:.2f}M; "
          f"batch {args.batch}, {torch.get_num_threads()} threads")  # fmt: skip
    labels = torch.arange(args.batch) % 10
    start_codes = torch.zeros(args.batch, 8, 8, 4, dtype=torch.long)

    @torch.no_grad()
    def run_official():
        theirs.sample(start_codes, cond=labels, cached=True)

    @torch.no_grad()
    def run_ours():
        ours.generate(labels=labels, generator=torch.Generator().manual_seed(0), use_cache=True)

    # interleaved, best of each: the machine's noise hits both alike
    official_s, ours_s = float("inf"), float("inf")
    for _ in range(args.repeats):
        official_s = min(official_s, best_time(run_official, 1))
        ours_s = min(ours_s, best_time(run_ours, 1))
    print(f"official sample:  {args.batch / official_s:8.1f} samples/s ({official_s:.3f} s)")
    print(f"ours (generate):  {args.batch / ours_s:8.1f} samples/s ({ours_s:.3f} s)")
    print(f"ours / official:  {official_s / ours_s:.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_ours()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
