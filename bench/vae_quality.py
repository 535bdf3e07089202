"""Reconstruction quality of the RQ-VAE, measured the paper's way and against trivial baselines.

1. Demo data: the demo's RQ-VAE recipe (configs/demo.yaml, train_vae) on the demo's images,
   validation PSNR per depth, beside a plain conv autoencoder with a continuous latent.
2. Real photographs (scikit-image's bundled photos; crops of some photos train, crops of the
   others validate): RQ 8x8x4 against VQ 8x8x1 at the same K and steps for K = 16, 64, 256,
   and VQ 16x16x1: the paper's rate-distortion claim. PSNR at each depth 1..D goes to a PNG.
3. (--part photos-ablation) where the RQ - VQ gap goes: loss, per-depth codebooks, width, and
   the same autoencoder with no quantizer.

The training loop is the stage's own step (model/training.py vae_train_step) without
Ray, on one process. Figures only: nothing here asserts on time or quality.

    .venv/bin/python bench/vae_quality.py                   # parts 1-2, ~25 min on 2 cores
    .venv/bin/python bench/vae_quality.py --part photos --steps 400
    .venv/bin/python bench/vae_quality.py --part photos-ablation   # where the RQ - VQ gap goes
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.losses import reconstruction_loss
from model.rqvae import RQVAE
from model.training import build_train_state, learning_rate, psnr_per_image, vae_train_step
from pipeline.core.config import load_config
from pipeline.demo.data import DEMO_CLASSES, demo_image
from pipeline.formats.images import decode_image, to_model_tensor
from pipeline.stages.train_vae import TrainVAEConfig, reconstruction_grid

REPO = Path(__file__).resolve().parents[1]
TRAIN_PHOTOS = ("astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
                "brick", "grass", "gravel", "moon", "clock", "coins")  # fmt: skip
VAL_PHOTOS = ("chelsea", "rocket", "camera", "cell")  # never trained on


# -- data -------------------------------------------------------------------------------------


def demo_images(count: int, seed: int, size: int = 32) -> torch.Tensor:
    """Demo images as the pipeline sees them: drawn at 64 px, PNG, then the shard stage's
    decode + centre crop to `size` -> (N, 3, size, size) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    pixels = []
    for i in range(count):
        buffer = io.BytesIO()
        demo_image(DEMO_CLASSES[i % len(DEMO_CLASSES)], rng, 64)[0].save(buffer, "PNG")
        pixels.append(np.asarray(decode_image(buffer.getvalue(), size, "center_crop").image))
    return to_model_tensor(np.stack(pixels))


def photos(names: tuple[str, ...], scale: float = 1.0) -> list[np.ndarray]:
    """scikit-image's bundled photographs (no download), RGB uint8, resized by `scale`. At 1.0
    a 32 px crop is a patch of a 300-1400 px photo; at 0.25 it holds a dense quarter of the
    scene, which 800 steps of the tiny autoencoder cannot reconstruct (20 dB whatever the code:
    the autoencoder, not the quantizer, is then the bottleneck)."""
    import skimage.data
    from PIL import Image

    out = []
    for name in names:
        image = getattr(skimage.data, name)()
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
        pil = Image.fromarray(image.astype(np.uint8))
        w, h = pil.size
        pil = pil.resize((max(32, round(w * scale)), max(32, round(h * scale))),
                         Image.Resampling.LANCZOS)  # fmt: skip
        out.append(np.asarray(pil))
    return out


def random_crops(images: list[np.ndarray], count: int, rng: np.random.Generator,
                 size: int = 32) -> torch.Tensor:  # fmt: skip
    crops = []
    for _ in range(count):
        image = images[int(rng.integers(len(images)))]
        top = int(rng.integers(image.shape[0] - size + 1))
        left = int(rng.integers(image.shape[1] - size + 1))
        crop = image[top : top + size, left : left + size]
        crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return to_model_tensor(np.ascontiguousarray(np.stack(crops)))


# -- training ---------------------------------------------------------------------------------


@torch.no_grad()
def depth_psnr(model: RQVAE, val: torch.Tensor) -> list[float]:
    """Validation PSNR (dB) decoding the first d codes, d = 1..D."""
    model.eval()
    codes = model.encode(val)
    out = [psnr_per_image(model.decode_codes(codes, d), val).mean().item()
           for d in range(1, codes.shape[-1] + 1)]  # fmt: skip
    model.train()
    return out


def train(config: TrainVAEConfig, batches: Callable[[int], torch.Tensor], val: torch.Tensor,
          init: Callable[[RQVAE], None] | None = None,
          eval_every: int = 100) -> tuple[RQVAE, list[tuple[int, float]], float]:  # fmt: skip
    """The stage's step on one process -> (model, [(step, full-depth val PSNR)], seconds)."""
    torch.manual_seed(config.seed)
    state = build_train_state(config)
    if init is not None:
        init(state.model)
    curve, started = [], time.time()
    for step in range(config.steps):
        micro = [batches(step) for _ in range(config.grad_accum_steps)]
        vae_train_step(state, micro, step, config)
        if (step + 1) % eval_every == 0 or step + 1 == config.steps:
            curve.append((step + 1, depth_psnr(state.model, val)[-1]))
    return state.model.eval(), curve, time.time() - started


def trivial_autoencoder(train_images: torch.Tensor, val: torch.Tensor, steps: int,
                        batch_size: int) -> float:  # fmt: skip
    """A plain conv autoencoder (two stride-2 convs down, two transposed convs up, a continuous
    32-channel 8x8 latent, no quantizer): the floor a tokenizer should clear."""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 4, 2, 1), nn.SiLU(), nn.Conv2d(64, 32, 4, 2, 1),
                          nn.ConvTranspose2d(32, 64, 4, 2, 1), nn.SiLU(),
                          nn.ConvTranspose2d(64, 3, 4, 2, 1))  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.9))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = train_images[torch.randint(len(train_images), (batch_size,), generator=g)]
        loss = (model(x) - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return psnr_per_image(model(val), val).mean().item()


def continuous_ceiling(config: TrainVAEConfig, batches: Callable[[int], torch.Tensor],
                       val: torch.Tensor) -> float:  # fmt: skip
    """The same RQ-VAE encoder and decoder trained with the quantizer bypassed (a continuous
    latent of the same shape, same loss, lr and steps): the most any code can give them."""
    torch.manual_seed(config.seed)
    model = RQVAE(config.model_config()).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=tuple(config.betas))
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        x = batches(step)
        recon = model.decode_latents(model.encode_latents(x))
        loss = reconstruction_loss(recon, x, config.loss.recon_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.eval()
        return psnr_per_image(model.decode_latents(model.encode_latents(val)), val).mean().item()


def demo_config(**overrides) -> TrainVAEConfig:
    items = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return load_config(TrainVAEConfig, str(REPO / "configs" / "demo.yaml"), items)


# -- the two parts ----------------------------------------------------------------------------


def demo_part(steps: int | None, out: Path) -> dict:
    config = demo_config(**({"steps": steps} if steps else {}))
    train_images, val = demo_images(512, seed=0), demo_images(64, seed=1)
    g = torch.Generator().manual_seed(0)

    def batches(step: int) -> torch.Tensor:
        return train_images[torch.randint(len(train_images), (config.batch_size,), generator=g)]

    model, curve, seconds = train(config, batches, val, eval_every=max(1, config.steps // 8))
    per_depth = depth_psnr(model, val)
    baseline = trivial_autoencoder(train_images, val, config.steps, config.batch_size)
    reconstruction_grid(model, val[:16], str(out / "demo-reconstructions.png"))
    print(f"\n## demo data: configs/demo.yaml train_vae, {config.steps} steps, batch "
          f"{config.batch_size}, lr {config.lr} ({seconds:.0f} s on one process)")  # fmt: skip
    print("| depth | " + " | ".join(str(d) for d in range(1, len(per_depth) + 1)) + " |")
    print("|---|" + "---|" * len(per_depth))
    print("| val PSNR (dB) | " + " | ".join(f"{p:.2f}" for p in per_depth) + " |")
    print(f"curve (step, dB): {[(s, round(p, 2)) for s, p in curve]}")
    print(f"trivial conv autoencoder (continuous latent, same steps): {baseline:.2f} dB")
    return {"per_depth": per_depth, "curve": curve, "baseline": baseline, "seconds": seconds}


def photos_part(steps: int, out: Path, codebook_sizes: list[int]) -> dict:
    """RQ 8x8x4 against VQ 8x8x1 at each K (same autoencoder, recipe and steps), and VQ
    16x16x1 at the largest K: the same bits as RQ 8x8x4 spent on a finer grid."""
    train_photos, val_photos = photos(TRAIN_PHOTOS), photos(VAL_PHOTOS)
    val = random_crops(val_photos, 128, np.random.default_rng(123))
    runs = [(k, "RQ 8x8x4", {}) for k in codebook_sizes]
    runs += [(k, "VQ 8x8x1", {"code_depth": 1}) for k in codebook_sizes]
    runs += [(max(codebook_sizes), "VQ 16x16x1",
              {"code_depth": 1, "ch_mult": [1, 2], "attn_resolutions": [16]})]  # fmt: skip
    results: dict[tuple[int, str], dict] = {}
    for k, name, model_overrides in runs:
        config = demo_config(steps=steps, model={**model_overrides, "codebook_size": k})
        rng, batch = np.random.default_rng(0), config.batch_size
        model, curve, seconds = train(
            config, lambda _, rng=rng, batch=batch: random_crops(train_photos, batch, rng), val,
            eval_every=max(1, steps // 4),
        )  # fmt: skip
        results[(k, name)] = {"per_depth": depth_psnr(model, val), "curve": curve,
                              "seconds": seconds, "code_shape": model.config.code_shape}  # fmt: skip
        print(f"K {k} {name}: {results[(k, name)]['per_depth'][-1]:.2f} dB ({seconds:.0f} s)",
              flush=True)  # fmt: skip
    print(f"\n## real photographs: {len(TRAIN_PHOTOS)} photos train, {len(VAL_PHOTOS)} others "
          f"validate (128 crops of 32x32), {steps} steps each")  # fmt: skip
    print("| K | codes | bits per image | val PSNR (dB) | per depth |")
    print("|---|---|---:|---:|---|")
    for (k, name), r in results.items():
        h, w, d = r["code_shape"]
        depths = " / ".join(f"{p:.2f}" for p in r["per_depth"])
        bits = h * w * d * math.log2(k)
        print(f"| {k} | {name} | {bits:.0f} | {r['per_depth'][-1]:.2f} | {depths} |")
    for k in codebook_sizes:
        gap = results[(k, "RQ 8x8x4")]["per_depth"][-1] - results[(k, "VQ 8x8x1")]["per_depth"][-1]
        print(f"K {k}: RQ 8x8x4 - VQ 8x8x1 = {gap:+.2f} dB")
    plot_depths(results, codebook_sizes, out / "vae-quality-depths.png")
    return results


# name -> (RQVAEConfig overrides, TrainVAEConfig overrides, what to train). The VQ row is the
# same autoencoder at depth 1; "ceiling" the same autoencoder with no quantizer.
PHOTO_ABLATION = {
    "recipe (L1, ch 32)": ({}, {}, ("rq", "vq", "ceiling")),
    "per-depth codebooks": ({"shared_codebook": False}, {}, ("rq",)),
    "MSE loss": ({}, {"loss.recon_loss": "mse"}, ("rq", "vq", "ceiling")),
    "MSE loss, codes only": ({}, {"loss.recon_loss": "mse"}, ("rq", "vq")),  # for a K sweep
    "MSE loss, ch 64": ({"ch": 64}, {"loss.recon_loss": "mse"}, ("rq", "vq")),
}


def photos_ablation(steps: int, codebook_size: int = 256, rows: list[str] | None = None) -> dict:
    """Where the RQ - VQ gap goes: each row trains RQ 8x8x4, VQ 8x8x1 and/or the same
    autoencoder with no quantizer (the continuous ceiling) on the photos, validated as in
    photos_part."""
    train_photos, val_photos = photos(TRAIN_PHOTOS), photos(VAL_PHOTOS)
    val = random_crops(val_photos, 128, np.random.default_rng(123))
    results = {}
    for name in rows or list(PHOTO_ABLATION):
        model_overrides, overrides, kinds = PHOTO_ABLATION[name]
        row = {}
        for kind in kinds:
            model = {**model_overrides, "codebook_size": codebook_size}
            if kind == "vq":
                model["code_depth"] = 1
            config = demo_config(steps=steps, model=model, **overrides)
            rng, batch = np.random.default_rng(0), config.batch_size
            batches = lambda _, rng=rng, batch=batch: random_crops(train_photos, batch, rng)  # noqa: E731
            started = time.time()
            if kind == "ceiling":
                row[kind] = [continuous_ceiling(config, batches, val)]
            else:
                row[kind] = depth_psnr(train(config, batches, val, eval_every=steps)[0], val)
            print(f"{name} / {kind}: {row[kind]} ({time.time() - started:.0f} s)", flush=True)
        results[name] = row
    print(f"\n## photos ablation: K = {codebook_size}, {steps} steps each")
    print("| setting | RQ 8x8x4 (per depth) | VQ 8x8x1 | RQ - VQ | no quantizer (ceiling) |")
    print("|---|---|---:|---:|---:|")
    for name, row in results.items():
        cells = ["-"] * 4
        if "rq" in row:
            cells[0] = f"{row['rq'][-1]:.2f} ({' / '.join(f'{p:.2f}' for p in row['rq'])})"
        if "vq" in row:
            cells[1] = f"{row['vq'][-1]:.2f}"
        if "rq" in row and "vq" in row:
            cells[2] = f"{row['rq'][-1] - row['vq'][-1]:+.2f}"
        if "ceiling" in row:
            cells[3] = f"{row['ceiling'][0]:.2f}"
        print(f"| {name} | " + " | ".join(cells) + " |")
    return results


def plot_depths(results: dict, codebook_sizes: list[int], path: Path) -> None:
    """PSNR of RQ's first d codes against d, one line per K, with VQ 8x8x1 at each K (dashed,
    same colour) and VQ 16x16x1 (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for i, k in enumerate(codebook_sizes):
        colour = f"C{i}"
        rq = results[(k, "RQ 8x8x4")]["per_depth"]
        ax.plot(range(1, len(rq) + 1), rq, "o-", color=colour, label=f"RQ 8x8x4, K {k}")
        ax.axhline(results[(k, "VQ 8x8x1")]["per_depth"][-1], linestyle="--", color=colour,
                   label=f"VQ 8x8x1, K {k}")  # fmt: skip
    k = max(codebook_sizes)
    ax.axhline(results[(k, "VQ 16x16x1")]["per_depth"][-1], linestyle=":", color="grey",
               label=f"VQ 16x16x1, K {k}")  # fmt: skip
    ax.set_xlabel("code depth d (RQ: the first d codes)")
    ax.set_ylabel("validation PSNR (dB)")
    ax.set_xticks(range(1, 5))
    ax.set_title("Real photos, 32x32 crops")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["demo", "photos", "photos-ablation", "all"],
                        default="all")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the demo config's for demo, 1500 photos)")  # fmt: skip
    parser.add_argument("--out", default="runs/bench", help="where the PNGs go")
    parser.add_argument("--codebook-sizes", type=int, nargs="+", default=[16, 64, 256],
                        help="K values of the photos part and its ablation (the ablation: first)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="*", choices=list(PHOTO_ABLATION), default=None,
                        help="photos-ablation rows to run (default: all)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part in ("demo", "all"):
        demo_part(args.steps, out)
    if args.part in ("photos", "all"):
        photos_part(args.steps or 1500, out, args.codebook_sizes)
    if args.part == "photos-ablation":
        photos_ablation(args.steps or 1500, args.codebook_sizes[0], args.rows)


if __name__ == "__main__":
    main()
