"""RQ-VAE training: the config and one optimisation step.

`vae_train_step` is the unit every trainer runs (one generator step, then one discriminator
step once the GAN is active, over `grad_accum_steps` micro-batches); the Ray Train stage
(pipeline/train_vae.py) runs it on each worker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from model.losses import VAELoss, VAELossConfig
from model.rqvae import RQVAE, RQVAEConfig
from pipeline.images import psnr_per_image
from pipeline.storage import StorageConfig, absolute
from pipeline.training import warmup_cosine
from pipeline.visualize import image_grid, save_png


@dataclass
class TrainVAEConfig:
    section: ClassVar[str] = "train_vae"
    # Execution knobs: where and how fast, not what is learned (not fingerprinted).
    execution_fields: ClassVar[tuple[str, ...]] = (
        "use_gpu", "cpus_per_worker", "threads_per_worker", "decode_cpus", "log_every",
        "checkpoint_every", "num_to_keep", "max_failures", "val_images", "storage",
    )  # fmt: skip

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
    shuffle_buffer: int = 1024  # rows; shards come in a new order each epoch (shuffled_batches)
    seed: int = 0
    grad_accum_steps: int = 1
    num_workers: int = 1  # the global batch is batch_size x num_workers x grad_accum_steps
    bf16: bool = True  # autocast on GPU
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int | None = None  # torch threads; default: Ray's (whole CPUs)
    decode_cpus: float = 0.5  # per Ray Data decode task
    log_every: int = 50
    checkpoint_every: int = 200
    num_to_keep: int = 2
    max_failures: int = 0
    val_images: int = 64
    storage: StorageConfig = field(default_factory=StorageConfig)

    def model_config(self) -> RQVAEConfig:
        base = dataclasses.asdict(RQVAEConfig.preset(self.model_preset))
        return RQVAEConfig.from_dict({**base, **self.model})

    def preflight(self) -> None:
        """Files this stage will need, checked before any stage of a run starts (and again
        when the stage starts on its own): a missing LPIPS file fails now, not after sharding."""
        if self.loss.perceptual_weight > 0:
            from model.losses import PerceptualLoss

            PerceptualLoss(self.loss.perceptual_weights_path or "")

    def __post_init__(self) -> None:
        self.model_config()  # unknown presets or keys fail at load time, not mid-run
        if self.loss.perceptual_weights_path:  # a local file, opened by the Ray Train workers
            self.loss.perceptual_weights_path = absolute(self.loss.perceptual_weights_path)
        for name in ("steps", "batch_size", "log_every", "grad_accum_steps", "num_workers",
                     "checkpoint_every"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class VAETrainState:
    model: RQVAE
    loss: VAELoss
    optimizer: torch.optim.Optimizer
    disc_optimizer: torch.optim.Optimizer | None
    forward: torch.nn.Module | None = None  # the model as called: a DDP wrapper, or None


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
    state: VAETrainState, micro_batches: list[Tensor], step: int, config: TrainVAEConfig
) -> dict[str, float]:
    """One optimisation step over (B, 3, R, R) micro-batches in [-1, 1] -> scalar metrics."""
    scale = warmup_cosine(step, config.steps, config.warmup_steps)
    for group in state.optimizer.param_groups:
        group["lr"] = config.lr * scale
    forward = state.forward or state.model
    use_gan = state.disc_optimizer is not None and state.loss.gan_active(step)
    n = len(micro_batches)
    terms: dict[str, float] = {}
    recons, stats = [], []
    state.optimizer.zero_grad(set_to_none=True)
    for images in micro_batches:
        with _autocast(images, config):
            out = forward(images)
            total, micro_terms = state.loss.generator_loss(
                images, out.recon, out.commitment_loss, state.model.quantizer.commitment_weight,
                step, state.model.last_layer,
            )  # fmt: skip
        (total / n).backward()
        recons.append(out.recon.detach())
        stats.append((out.perplexity, out.usage))
        for k, v in micro_terms.items():
            terms[k] = terms.get(k, 0.0) + v / n
    state.optimizer.step()
    if use_gan:
        state.disc_optimizer.zero_grad(set_to_none=True)
        for images, recon in zip(micro_batches, recons, strict=True):
            with _autocast(images, config):
                d_loss, d_terms = state.loss.discriminator_loss(images, recon)
            (d_loss / n).backward()
            for k, v in d_terms.items():
                terms[k] = terms.get(k, 0.0) + v / n
        state.disc_optimizer.step()
    terms["lr"] = config.lr * scale
    perplexity, usage = stats[-1]
    for d, (p, u) in enumerate(zip(perplexity.tolist(), usage.tolist(), strict=True)):
        terms[f"perplexity_d{d + 1}"], terms[f"usage_d{d + 1}"] = p, u
    return terms


def _autocast(images: Tensor, config: TrainVAEConfig) -> torch.autocast:
    on_gpu = images.device.type == "cuda"
    return torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=on_gpu and config.bf16)


@torch.no_grad()
def psnr(model: RQVAE, images: Tensor) -> float:
    """Mean PSNR (dB) of full-depth reconstructions, images in [-1, 1] (peak-to-peak 2)."""
    return psnr_per_image(model.decode_codes(model.encode(images)), images).mean().item()


@torch.no_grad()
def reconstruction_grid(
    model: RQVAE, images: Tensor, uri: str, storage_options: dict | None = None
) -> None:
    """Originals on the first row, then reconstructions from depth 1 to D (coarse to fine)."""
    was_training = model.training
    model.eval()
    codes = model.encode(images)
    rows = [images] + [model.decode_codes(codes, d) for d in range(1, codes.shape[-1] + 1)]
    save_png(image_grid(rows, scale=max(1, 96 // images.shape[-1])), uri, storage_options)
    model.train(was_training)
