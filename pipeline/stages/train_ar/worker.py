"""train-ar's Ray Train loop: one worker's model, optimizer, steps, metrics and checkpoints."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict
from functools import partial
from typing import Any

import numpy as np
import torch

from model.flops import rqtransformer_flops_per_sample, throughput_terms
from model.rqtransformer import Block, RQTransformer, RQTransformerConfig
from model.training import (
    WeightEMA,
    ar_train_step,
    build_optimizer,
    soft_quantizer,
    validation_loss,
)
from model.weights.serialization import init_from_pretrained
from pipeline.core.checkpoint import load_state, save_state
from pipeline.core.config import to_dict
from pipeline.core.fsdp import (
    SHARDED_DIR,
    full_model_state,
    is_sharded,
    load_full_into_sharded,
    load_full_model,
    load_sharded,
    save_sharded,
    shard_model,
)
from pipeline.core.storage import Storage, join
from pipeline.core.tracking import open_tracker
from pipeline.core.training import (
    DataPosition,
    RunMetrics,
    check_data_position,
    report_checkpoint,
    run_steps,
    step_seed,
    train_worker_setup,
)


class SamplePreview:
    """A grid of samples, one row per class (or per val caption, or rows of unconditional
    samples), decoded with the RQ-VAE: what training has learned, at each checkpoint."""

    def __init__(self, vae_uri: str, storage: Storage, num_classes: int, per_row: int,
                 prompts: np.ndarray | None = None) -> None:  # fmt: skip
        from model.rqvae import RQVAE

        self.vae = RQVAE.from_pretrained(vae_uri, storage_options=storage.options(vae_uri)).eval()
        self.prompts = prompts  # (rows, L) caption token ids, for a caption model
        self.rows = len(prompts) if prompts is not None else min(max(num_classes, 1), 10)
        self.num_classes, self.per_row = num_classes, per_row

    @torch.no_grad()
    def write(self, model: RQTransformer, uris: list[str], storage_options: dict) -> None:
        from pipeline.formats.images import image_grid, save_png

        was_training = model.training
        model.eval()
        device = model.pos_embedding.device
        generator = torch.Generator(device).manual_seed(0)
        rows = []
        for row in range(self.rows):
            if self.prompts is not None:
                text = torch.tensor(self.prompts[row], device=device).repeat(self.per_row, 1)
                codes = model.generate(text=text, generator=generator, top_k=64)
            else:
                labels = [row] * self.per_row if self.num_classes else None
                codes = model.generate(self.per_row, labels, generator=generator, top_k=64)
            rows.append(self.vae.to(device).decode_codes(codes).clamp(-1, 1))
        model.train(was_training)
        grid = image_grid(rows, scale=max(1, 96 // rows[0].shape[-1]))
        for uri in uris:
            save_png(grid, uri, storage_options)


def _save_checkpoint(model: RQTransformer, optimizer, ema: WeightEMA | None, step: int,
                     position: DataPosition, rank: int, directory: str) -> None:  # fmt: skip
    average = ema.average if ema is not None else None
    trainer = {"step": step, "data": asdict(position)}
    if is_sharded(model):  # collective: each rank its shards
        save_sharded(model, optimizer, trainer, directory, rank, average)
        return
    save_state({"model": model.state_dict()}, directory, "model")
    save_state({**trainer, "optimizer": optimizer.state_dict()}, directory, "trainer")
    if average is not None:
        save_state({"model": average.state_dict()}, directory, "ema")


def _load_checkpoint(model: RQTransformer, optimizer, ema: WeightEMA | None, directory: str,
                     batch_size: int = 0) -> tuple[int, DataPosition]:  # fmt: skip
    """Either layout into either strategy (a run may change `strategy` when it resumes);
    -> the checkpoint's step and data position."""
    average = ema.average if ema is not None else None
    if os.path.isdir(os.path.join(directory, SHARDED_DIR)):
        trainer = load_sharded(model, optimizer, directory, average)
        return int(trainer["step"]), DataPosition.of(trainer, batch_size)
    model_state = load_state(directory, "model")["model"]
    trainer = load_state(directory, "trainer")
    if is_sharded(model):
        load_full_into_sharded(model, optimizer, model_state, trainer["optimizer"])
    else:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(trainer["optimizer"])
    if average is not None:
        load_full_model(average, load_state(directory, "ema")["model"])
    return int(trainer["step"]), DataPosition.of(trainer, batch_size)


class RankZeroCopy:
    """Under FSDP no rank holds the whole model, but validation, the preview and the export
    want it: rank 0 keeps an unsharded copy, refreshed from the shards (a collective every rank
    joins) at most once per step. Without FSDP the model itself."""

    def __init__(self, model: RQTransformer, rank: int, code_embeddings: torch.Tensor,
                 device: torch.device) -> None:  # fmt: skip
        self.model, self.step = model, -1
        self.copy = model
        if is_sharded(model):
            with torch.random.fork_rng(devices=[]):  # its init must not move rank 0's RNG
                copy = RQTransformer(model.config, code_embeddings) if rank == 0 else None
            self.copy = copy.to(device) if copy is not None else None

    def at(self, step: int) -> RQTransformer | None:
        if self.copy is not self.model and self.step != step:
            state = full_model_state(self.model)  # every rank; only rank 0 gets the tensors
            if self.copy is not None:
                self.copy.load_state_dict(state)
            self.step = step
        return self.copy


def train_ar_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray.train
    import ray.train.torch

    config = loop_config["config"]  # TrainARConfig
    model_config: RQTransformerConfig = loop_config["model_config"]
    run_dir: str = loop_config["run_dir"]
    ar_dir = join(run_dir, "ar")
    rank, world, device = train_worker_setup(config.threads_per_worker, config.deterministic)
    storage = Storage(config.storage)
    condition = "text" if model_config.text_vocab_size else (
        "class" if model_config.num_classes else "none")  # fmt: skip

    torch.manual_seed(config.seed)  # same seed on every rank: identical initial weights
    code_embeddings = torch.tensor(loop_config["code_embeddings"])  # (books, K, C)
    model = RQTransformer(model_config, code_embeddings)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.init_from:  # fine-tuning: its weights, a fresh optimizer
        init_from_pretrained(model, config.init_from, storage.options(config.init_from))
        if not torch.equal(model.code_embeddings, code_embeddings.float()):
            raise ValueError(f"init_from={config.init_from} was trained on the codes of another "
                             f"RQ-VAE than the one that encoded these tables")  # fmt: skip
    model.to(device)
    # the weights' average, exported in their place (ema_decay > 0); sharded as the model
    ema = WeightEMA.of(model, config.ema_decay) if config.ema_decay else None
    if config.strategy == "fsdp":  # each transformer block a shard group
        shard_model(model, (Block,))
        if ema is not None:
            shard_model(ema.average, (Block,))
    optimizer = build_optimizer(model, config)  # after sharding: over the DTensor parameters
    start, position = 0, DataPosition()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start, position = _load_checkpoint(model, optimizer, ema, directory, config.batch_size)
    exact = check_data_position(position, loop_config["start_epoch"], rank, world)
    forward = model
    if world > 1 and config.strategy == "ddp":
        forward = ray.train.torch.prepare_model(model, device)
    if config.compile:  # the forward and its backward through torch.compile (inductor)
        forward = torch.compile(forward)
    # rank 0's whole copies: of what is exported (the average, when on) and of the raw weights
    whole = RankZeroCopy(ema.average if ema is not None else model, rank, code_embeddings, device)
    raw = RankZeroCopy(model, rank, code_embeddings, device) if ema is not None else None
    quantizer = (
        soft_quantizer(code_embeddings, model_config.depth).to(device)
        if config.targets == "soft"
        else None
    )
    generator = torch.Generator(device)  # the soft codes' draws, seeded every step
    val = {k: torch.tensor(v, device=device) for k, v in loop_config["val"].items()}

    metrics = preview = None
    if rank == 0:
        params = {**to_dict(config), "model": dataclasses.asdict(model_config)}
        tracker = open_tracker(config.tracking, run_dir, "train-ar", params, storage)
        metrics = RunMetrics(storage, ar_dir, "train-ar", start, tracker)
        if config.preview_per_class > 0:
            preview = SamplePreview(loop_config["vae_uri"], storage, model_config.num_classes,
                                    config.preview_per_class, loop_config["preview_prompts"])  # fmt: skip
        metrics.write(
            {"step": start, "event": "resumed", "workers": world, "exact": exact}
            if start > 0
            else {"step": 0, "event": "started", "workers": world}
        )
    tokens_per_row = int(np.prod(model_config.code_shape))

    def train_step(micro: list[dict[str, torch.Tensor]], step: int) -> tuple[dict[str, float], int]:
        generator.manual_seed(step_seed(config.seed, step, rank, stream=1))
        terms = ar_train_step(forward, optimizer, micro, step, config, condition, quantizer,
                              generator)  # fmt: skip
        if ema is not None:
            ema.update(model, step)
        return terms, sum(len(m["codes"]) for m in micro)

    flops_per_row = rqtransformer_flops_per_sample(model_config, code_embeddings.shape[-1])

    def log(step: int, terms: dict[str, float]) -> None:  # every rank: whole.at is collective
        evaluated = whole.at(step)
        unaveraged = raw.at(step) if raw is not None else None
        if metrics is None:
            return
        rows_per_s = terms.pop("rows_per_s_per_worker")
        terms["tokens_per_s_per_worker"] = rows_per_s * tokens_per_row
        terms.update(throughput_terms(rows_per_s, flops_per_row, device))
        terms.update(validation_loss(evaluated, val, condition, quantizer, config))
        if unaveraged is not None:  # the raw weights' figure beside the average's
            raw_val = validation_loss(unaveraged, val, condition, quantizer, config)
            terms["val_loss_raw"] = raw_val["val_loss"]
        metrics.write({"step": step, **terms})

    def save(step: int, position: DataPosition) -> None:
        evaluated = whole.at(step) if config.preview_per_class > 0 else None
        if metrics is not None:
            grids = []
            if preview is not None:
                grids = [
                    join(ar_dir, "samples.png"),
                    join(ar_dir, "samples", f"step-{step:07d}.png"),
                ]
                preview.write(evaluated, grids, storage.options(ar_dir))
            metrics.checkpoint(step, grids[:1])
        report_checkpoint(step, rank, partial(_save_checkpoint, model, optimizer, ema, step,
                                              position, rank),
                          every_rank=is_sharded(model))  # fmt: skip

    run_steps(ray.train.get_dataset_shard("train"), config, device, start, rank, train_step,
              log, save, views=loop_config["views"], position=position, ranks=world)  # fmt: skip
    exports = {"model": whole.at(config.steps)}  # every rank: collective under FSDP
    if raw is not None:  # the raw weights stay exportable
        exports["model-raw"] = raw.at(config.steps)
    if metrics is not None:
        for folder, final in exports.items():
            final.eval().save_pretrained(join(ar_dir, folder), storage.options(ar_dir))
            if condition == "text":  # the tokenizer travels with the model
                storage.write_bytes(join(ar_dir, folder, "tokenizer.json"),
                                    loop_config["tokenizer_json"].encode())  # fmt: skip
        metrics.close()
