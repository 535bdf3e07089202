"""RQ-VAE training: the config, one optimisation step, and a single-process loop.

`vae_train_step` is the unit every trainer runs (one generator step, then one discriminator
step once the GAN is active); `train_vae_in_memory` drives it over an in-memory image tensor.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from model.losses import VAELoss, VAELossConfig
from model.rqvae import RQVAE, RQVAEConfig
from pipeline.training import MetricsLog, warmup_cosine
from pipeline.visualize import image_grid, save_png


@dataclass
class TrainVAEConfig:
    section: ClassVar[str] = "train_vae"

    model_preset: str = "tiny"  # an RQVAEConfig preset ...
    model: dict[str, Any] = field(default_factory=dict)  # ... and field overrides on top of it
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    steps: int = 1000
    batch_size: int = 32
    lr: float = 4e-4
    disc_lr: float = 4e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    warmup_steps: int = 50
    random_flip: bool = True
    seed: int = 0
    log_every: int = 50

    def model_config(self) -> RQVAEConfig:
        base = dataclasses.asdict(RQVAEConfig.preset(self.model_preset))
        return RQVAEConfig.from_dict({**base, **self.model})

    def __post_init__(self) -> None:
        self.model_config()  # unknown presets or keys fail at load time, not mid-run
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class VAETrainState:
    model: RQVAE
    loss: VAELoss
    optimizer: torch.optim.Optimizer
    disc_optimizer: torch.optim.Optimizer | None


def build_train_state(config: TrainVAEConfig) -> VAETrainState:
    torch.manual_seed(config.seed)
    model = RQVAE(config.model_config())
    loss = VAELoss(config.loss, model.config.in_channels)
    betas = tuple(config.betas)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=betas)
    disc_optimizer = (
        torch.optim.Adam(loss.discriminator.parameters(), lr=config.disc_lr, betas=betas)
        if loss.discriminator is not None
        else None
    )
    return VAETrainState(model.train(), loss, optimizer, disc_optimizer)


def vae_train_step(
    state: VAETrainState, images: Tensor, step: int, config: TrainVAEConfig
) -> dict[str, float]:
    """One step on a batch of (B, 3, R, R) images in [-1, 1] -> scalar metrics."""
    scale = warmup_cosine(step, config.steps, config.warmup_steps)
    for group in state.optimizer.param_groups:
        group["lr"] = config.lr * scale
    out = state.model(images)
    total, terms = state.loss.generator_loss(
        images,
        out.recon,
        out.commitment_loss,
        state.model.quantizer.commitment_weight,
        step,
        state.model.last_layer,
    )
    state.optimizer.zero_grad(set_to_none=True)
    total.backward()
    state.optimizer.step()
    if state.disc_optimizer is not None and state.loss.gan_active(step):
        d_loss, d_terms = state.loss.discriminator_loss(images, out.recon)
        state.disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        state.disc_optimizer.step()
        terms.update(d_terms)
    terms["lr"] = config.lr * scale
    for d, (p, u) in enumerate(zip(out.perplexity.tolist(), out.usage.tolist(), strict=True)):
        terms[f"perplexity_d{d + 1}"], terms[f"usage_d{d + 1}"] = p, u
    return terms


@torch.no_grad()
def psnr(model: RQVAE, images: Tensor) -> float:
    """Mean PSNR (dB) of full-depth reconstructions, images in [-1, 1] (peak-to-peak 2)."""
    recon = model.decode_codes(model.encode(images)).clamp(-1, 1)
    mse = (recon - images).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(4.0 / mse)).mean().item()


@torch.no_grad()
def reconstruction_grid(model: RQVAE, images: Tensor, uri: str) -> None:
    """Originals on the first row, then reconstructions from depth 1 to D (coarse to fine)."""
    was_training = model.training
    model.eval()
    codes = model.encode(images)
    rows = [images] + [model.decode_codes(codes, d) for d in range(1, codes.shape[-1] + 1)]
    save_png(image_grid(rows, scale=max(1, 96 // images.shape[-1])), uri)
    model.train(was_training)


def train_vae_in_memory(
    config: TrainVAEConfig, train: Tensor, val: Tensor, out_dir: str | Path
) -> RQVAE:
    """Train on (N, 3, R, R) tensors; metrics to out_dir/metrics.jsonl; returns the model."""
    state = build_train_state(config)
    log = MetricsLog(Path(out_dir) / "metrics.jsonl")
    generator = torch.Generator().manual_seed(config.seed)
    seen, window_start = 0, time.time()
    for step in range(config.steps):
        batch = train[torch.randint(len(train), (config.batch_size,), generator=generator)]
        if config.random_flip:
            flip = torch.rand(len(batch), generator=generator) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        terms = vae_train_step(state, batch, step, config)
        seen += len(batch)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            state.model.eval()
            terms["val_psnr"] = psnr(state.model, val)
            state.model.train()
            terms["images_per_s"] = seen / (time.time() - window_start)
            seen, window_start = 0, time.time()
            log.write(step + 1, terms)
    return state.model.eval()
