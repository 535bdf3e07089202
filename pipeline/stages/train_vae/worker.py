"""train-vae's Ray Train loop: one worker's model, discriminator, optimizers, steps, metrics,
checkpoints and reconstruction grids."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from model.flops import counted_flops, throughput_terms
from model.rqvae import RQVAE
from model.training import VAETrainState, WeightEMA, build_train_state, psnr, vae_train_step
from model.weights.serialization import init_from_pretrained
from pipeline.core.checkpoint import load_state, save_state
from pipeline.core.config import to_dict
from pipeline.core.storage import Storage, join
from pipeline.core.tracking import open_tracker
from pipeline.core.training import (
    DataPosition,
    RunMetrics,
    check_data_position,
    report_checkpoint,
    run_steps,
    train_worker_setup,
)
from pipeline.formats.images import image_grid, save_png

if TYPE_CHECKING:
    from pipeline.stages.train_vae import TrainVAEConfig


def pixels_to_model(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _save_checkpoint(state: VAETrainState, discriminator: torch.nn.Module | None,
                     ema: WeightEMA | None, step: int, position: DataPosition,
                     directory: str) -> None:  # fmt: skip
    save_state({"model": state.model.state_dict()}, directory, "model")
    if ema is not None:
        save_state({"model": ema.average.state_dict()}, directory, "ema")
    trainer: dict[str, Any] = {"step": step, "data": asdict(position),
                               "optimizer": state.optimizer.state_dict()}  # fmt: skip
    if discriminator is not None:
        trainer["discriminator"] = discriminator.state_dict()
        trainer["disc_optimizer"] = state.disc_optimizer.state_dict()
    save_state(trainer, directory, "trainer")


def _load_checkpoint(state: VAETrainState, ema: WeightEMA | None, directory: str,
                     batch_size: int) -> tuple[int, DataPosition]:  # fmt: skip
    state.model.load_state_dict(load_state(directory, "model")["model"])
    if ema is not None:
        ema.average.load_state_dict(load_state(directory, "ema")["model"])
    trainer = load_state(directory, "trainer")
    state.optimizer.load_state_dict(trainer["optimizer"])
    if state.disc_optimizer is not None:
        state.loss.discriminator.load_state_dict(trainer["discriminator"])
        state.disc_optimizer.load_state_dict(trainer["disc_optimizer"])
    return int(trainer["step"]), DataPosition.of(trainer, batch_size)


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


def train_vae_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray.train
    import ray.train.torch

    config: TrainVAEConfig = loop_config["config"]
    run_dir: str = loop_config["run_dir"]
    vae_dir = join(run_dir, "vae")
    rank, world, device = train_worker_setup(config.threads_per_worker, config.deterministic)
    storage = Storage(config.storage)

    state = build_train_state(config)  # same seed on every rank: identical initial weights
    discriminator = state.loss.discriminator  # unwrapped, for checkpoints
    start, position = 0, DataPosition()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.init_from:  # fine-tuning: its weights, fresh optimizers
        init_from_pretrained(state.model, config.init_from, storage.options(config.init_from))
    # the weights' average, exported in their place (ema_decay > 0)
    ema = WeightEMA.of(state.model, config.ema_decay) if config.ema_decay else None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start, position = _load_checkpoint(state, ema, directory, config.batch_size)
    exact = check_data_position(position, loop_config["start_epoch"], rank, world)
    state.model.to(device)
    state.loss.to(device)
    exported = state.model  # what the stage exports, validates and reconstructs with
    if ema is not None:
        exported = ema.average.to(device)
    for optimizer in (state.optimizer, state.disc_optimizer):
        if optimizer is not None:  # state loaded on CPU follows the parameters to the device
            optimizer.load_state_dict(optimizer.state_dict())
    if world > 1:
        # Codebook buffers stay identical through the quantizer's own all-reduce.
        kwargs = {"broadcast_buffers": False}
        state.forward = ray.train.torch.prepare_model(
            state.model, device, parallel_strategy_kwargs=kwargs
        )
        if state.loss.discriminator is not None:
            state.loss.discriminator = ray.train.torch.prepare_model(
                state.loss.discriminator, device, parallel_strategy_kwargs=kwargs
            )
    if config.compile:  # the forward and its backward through torch.compile (inductor)
        state.forward = torch.compile(state.model if state.forward is None else state.forward)
    val = pixels_to_model(torch.tensor(loop_config["val_images"])).to(
        device
    )  # object store: read-only

    metrics = None
    if rank == 0:
        tracker = open_tracker(config.tracking, run_dir, "train-vae", to_dict(config), storage)
        metrics = RunMetrics(storage, vae_dir, "train-vae", start, tracker)
        metrics.write(
            {"step": start, "event": "resumed", "workers": world, "exact": exact}
            if start > 0
            else {"step": 0, "event": "started", "workers": world}
        )

    def train_step(micro: list[dict[str, Tensor]], step: int) -> tuple[dict[str, float], int]:
        images = [pixels_to_model(batch["image"]) for batch in micro]
        terms = vae_train_step(state, images, step, config)
        if ema is not None:
            ema.update(state.model, step)
        return terms, sum(len(i) for i in images)

    # Model FLOPs of one training image: 3 forwards of encoder, quantizer and decoder.
    flops_per_image = 3 * counted_flops(state.model, val[:1]) if metrics is not None else 0.0

    def log(step: int, terms: dict[str, float]) -> None:
        terms["images_per_s_per_worker"] = terms.pop("rows_per_s_per_worker")
        terms.update(throughput_terms(terms["images_per_s_per_worker"], flops_per_image, device))
        state.model.eval()
        terms["val_psnr"] = psnr(exported, val)
        if ema is not None:  # the raw weights' figure beside the average's
            terms["val_psnr_raw"] = psnr(state.model, val)
        state.model.train()
        metrics.write({"step": step, **terms})

    def save(step: int, position: DataPosition) -> None:
        if metrics is not None:
            grids = [join(vae_dir, "reconstructions.png"),  # the latest, and one per checkpoint
                     join(vae_dir, "reconstructions", f"step-{step:07d}.png")]  # fmt: skip
            for uri in grids:
                reconstruction_grid(exported, val[:16], uri, storage.options(vae_dir))
            metrics.checkpoint(step, grids[:1])
        report_checkpoint(step, rank, lambda directory: _save_checkpoint(
            state, discriminator, ema, step, position, directory))  # fmt: skip

    run_steps(ray.train.get_dataset_shard("train"), config, device, start, rank, train_step,
              log if metrics is not None else lambda step, terms: None, save, torch.uint8,
              position=position, ranks=world)  # fmt: skip
    if metrics is not None:
        exported.eval().save_pretrained(join(vae_dir, "model"), storage.options(vae_dir))
        if ema is not None:  # the raw weights stay exportable
            state.model.eval().save_pretrained(join(vae_dir, "model-raw"),
                                               storage.options(vae_dir))  # fmt: skip
        metrics.close()
