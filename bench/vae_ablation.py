"""Why the tiny RQ-VAE learned slowly: one factor at a time, on the demo data.

Each row trains the `tiny` RQ-VAE (quantizer included) with the stage's own step for the same
number of steps and reports validation PSNR at full depth and at depth 1. The first row is the
recipe as it was (VQGAN default init, lr 2e-3); the second is today's demo recipe; the rest
change one thing from today's recipe. Figures only, nothing asserted.

    .venv/bin/python bench/vae_ablation.py --steps 400      # ~9 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vae_quality import demo_config, demo_images, depth_psnr, train

import model.rqvae as rqvae


def vqgan_default_init(model: rqvae.RQVAE) -> None:
    """Undo the zero init of residual branches and attention outputs (PyTorch's default init,
    as VQGAN and the official RQ-VAE have it)."""
    for module in model.modules():
        if isinstance(module, rqvae.ResnetBlock):
            module.conv2.reset_parameters()
        elif isinstance(module, rqvae.AttnBlock):
            module.proj.reset_parameters()


def with_group_norm(make: Callable[[int], torch.nn.Module]) -> Callable:
    """Build the model with another norm layer (the bench swaps the module's factory)."""

    @contextlib.contextmanager
    def context():
        saved, rqvae._group_norm = rqvae._group_norm, make
        try:
            yield
        finally:
            rqvae._group_norm = saved

    return context


# (name, config overrides, init, context around model building)
VARIANTS: list[tuple[str, dict, Callable | None, Callable | None]] = [
    ("before: default init, lr 2e-3", {"lr": 2e-3}, vqgan_default_init, None),
    ("today's demo recipe", {}, None, None),
    ("default init (VQGAN's)", {}, vqgan_default_init, None),
    ("lr 2e-3", {"lr": 2e-3}, None, None),
    ("lr 1e-3", {"lr": 1e-3}, None, None),
    ("lr 5e-4", {"lr": 5e-4}, None, None),
    ("lr 1e-4", {"lr": 1e-4}, None, None),
    ("Adam betas (0.9, 0.99)", {"betas": [0.9, 0.99]}, None, None),
    ("warm-up 100 steps", {"warmup_steps": 100}, None, None),
    ("MSE instead of L1", {"loss.recon_loss": "mse"}, None, None),
    ("no attention", {"model": {"attn_resolutions": []}}, None, None),
    ("GroupNorm: 1 group (layer norm)", {}, None,
     with_group_norm(lambda c: torch.nn.GroupNorm(1, c, eps=1e-6))),
    ("GroupNorm: 1 channel a group (instance norm)", {}, None,
     with_group_norm(lambda c: torch.nn.GroupNorm(c, c, eps=1e-6))),
    ("depth: 2 residual blocks a level", {"model": {"num_res_blocks": 2}}, None, None),
    ("width ch 64 (4x the FLOPs)", {"model": {"ch": 64}}, None, None),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_images, val = demo_images(512, seed=0), demo_images(64, seed=1)
    base = demo_config(steps=args.steps)
    print(f"tiny RQ-VAE on the demo data, {args.steps} steps, batch {base.batch_size}; "
          f"today's recipe: lr {base.lr}, betas {base.betas}, warm-up {base.warmup_steps}, "
          f"{base.loss.recon_loss}, zero-init residual branches")  # fmt: skip
    print("\n| variant | val PSNR (dB) | depth 1 | seconds |")
    print("|---|---|---|---|")
    for name, overrides, init, context in VARIANTS:
        config = demo_config(steps=args.steps, **overrides)
        g = torch.Generator().manual_seed(0)

        def batches(_: int, config=config, g=g) -> torch.Tensor:
            return train_images[torch.randint(len(train_images), (config.batch_size,), generator=g)]

        with context() if context is not None else contextlib.nullcontext():
            model, _, seconds = train(config, batches, val, init, eval_every=args.steps)
        per_depth = depth_psnr(model, val)
        shown = [f"{p:.2f}" if math.isfinite(p) else "nan" for p in (per_depth[-1], per_depth[0])]
        print(f"| {name} | {shown[0]} | {shown[1]} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
