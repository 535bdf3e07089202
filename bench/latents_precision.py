"""Do the code tables' float16 latents cost the soft targets accuracy?

train-ar's soft targets (`targets: soft`, every paper recipe) are q_d = softmax(-||r_{d-1} -
e_k||^2 / T) over the residuals of each image's stored latents, which the encode stage keeps
in float16 (`with_latents`). This takes a finished run's RQ-VAE and images, computes each
image's latents in float32, rounds them to float16 as the tables do, and compares the targets
built from each at the paper's temperature 0.5: the argmin codes, the KL divergence of the
distributions per depth, and how often stochastic codes drawn with the same generator differ.

    .venv/bin/python bench/latents_precision.py runs/demo [--images 512]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.rqvae import RQVAE
from model.training import soft_quantizer
from pipeline.core.storage import StorageConfig
from pipeline.formats.shard_tar import decode_shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished run dir (shards/ and vae/model)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.5)
    args = parser.parse_args()
    run = Path(args.run)
    vae = RQVAE.from_pretrained(str(run / "vae" / "model")).eval()
    manifest = json.loads((run / "shards" / "_manifest.json").read_text())
    images = []
    for unit in manifest["units"]:
        images.append(decode_shard(str(run / "shards" / unit["name"]), vae.config.resolution,
                                   StorageConfig())["images"])  # fmt: skip
        if sum(len(i) for i in images) >= args.images:
            break
    x = torch.tensor(np.concatenate(images)[: args.images])
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z32 = vae.encode_latents(x).float()  # (N, h, w, C)
    z16 = z32.half().float()
    depth = vae.config.code_shape[-1]
    quantizer = soft_quantizer(vae.quantizer.codebooks, depth)
    codes32 = vae.quantizer.encode(z32)
    codes16 = vae.quantizer.encode(z16)
    _, q32 = quantizer.soft_codes(z32, args.temperature, stochastic=False)
    _, q16 = quantizer.soft_codes(z16, args.temperature, stochastic=False)
    draw32, _ = quantizer.soft_codes(
        z32, args.temperature, generator=torch.Generator().manual_seed(0)
    )
    draw16, _ = quantizer.soft_codes(
        z16, args.temperature, generator=torch.Generator().manual_seed(0)
    )
    kl = (q32 * (q32.clamp_min(1e-30).log() - q16.clamp_min(1e-30).log())).sum(-1)  # (N,h,w,D)
    print(f"{len(x)} images of {run}, latents {tuple(z32.shape[1:])}, T = {args.temperature}; "
          f"max |z32 - z16| {float((z32 - z16).abs().max()):.2e} (relative "
          f"{float(((z32 - z16).abs() / z32.abs().clamp_min(1e-6)).median()):.1e} median)")  # fmt: skip
    print(
        "| depth | argmin codes equal | mean KL(q32 || q16), nats | max KL | stochastic codes equal |"
    )
    print("|---:|---:|---:|---:|---:|")
    for d in range(depth):
        equal = (codes32[..., d] == codes16[..., d]).float().mean().item()
        drawn = (draw32[..., d] == draw16[..., d]).float().mean().item()
        print(f"| {d + 1} | {equal:.4%} | {kl[..., d].mean().item():.2e} | "
              f"{kl[..., d].max().item():.2e} | {drawn:.4%} |")  # fmt: skip


if __name__ == "__main__":
    main()
