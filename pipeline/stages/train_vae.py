"""The train-vae stage: the RQ-VAE trained on RUN/shards/ with Ray Train, written to RUN/vae/.

RUN/vae/ holds Ray Train's run (checkpoints: model, discriminator, optimizers, step, codebook EMA
state, all as safetensors + JSON), `metrics.jsonl` (object stores: `metrics/part-*.jsonl`),
`curves.png`, `reconstructions.png` (originals above, depth 1..D below; one per checkpoint too),
`config.yaml`, and at the end `model/` (save_pretrained) and `_manifest.json`. The Ray Train run
is named after the run dir, so a re-submitted run resumes from its last checkpoint, with the
config it was started with (`steps` may rise: an extension); FailureConfig restarts failed
workers within a run from the last checkpoint (`max_failures`, 3). `init_from` starts from an
exported RQ-VAE instead of scratch. `pretrained` trains nothing: the exported RQ-VAE it names
(a folder, hf://org/name, or what `rqpipe import-official` wrote) becomes RUN/vae/model, with
its reconstructions of the val split, so encode and train-ar run on it.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from model.flops import counted_flops, throughput_terms
from model.losses import VAELossConfig
from model.rqvae import RQVAE, RQVAEConfig
from model.serialization import init_from_pretrained
from model.training import VAETrainState, build_train_state, psnr, vae_train_step
from pipeline.core.checkpoint import load_state, save_state
from pipeline.core.config import output_fields, to_dict, write_resolved_config
from pipeline.core.lease import single_writer
from pipeline.core.manifest import (
    Manifest,
    begin_stage,
    model_fingerprint,
    require_manifest,
    write_manifest,
)
from pipeline.core.storage import (
    Storage,
    StorageConfig,
    absolute,
    join,
    model_files,
    model_location,
    require_model_folders,
)
from pipeline.core.tracking import TrackingConfig, open_tracker
from pipeline.core.training import (
    RESUMABLE_FIELDS,
    RunMetrics,
    check_one_batch,
    epoch_file_order,
    init_from_fingerprint,
    latest_checkpoint_step,
    report_checkpoint,
    resume_seed,
    run_steps,
    train_run_config,
    train_worker_setup,
)
from pipeline.formats.images import image_grid, save_png
from pipeline.formats.shard_tar import IMAGE_EXTENSIONS, image_member, iter_tar

FORMAT_VERSION = 1


@dataclass
class TrainVAEConfig:
    section: ClassVar[str] = "train_vae"
    # Execution knobs: where and how fast, not what is learned (not fingerprinted).
    execution_fields: ClassVar[tuple[str, ...]] = (
        "use_gpu", "compile", "cpus_per_worker", "threads_per_worker", "decode_cpus", "log_every",
        "checkpoint_every", "num_to_keep", "max_failures", "val_images", "storage", "tracking",
        "init_from", "pretrained",  # fingerprinted as the model's fingerprint (upstream)
    )  # fmt: skip

    model_preset: str = "tiny"  # an RQVAEConfig preset ...
    model: dict[str, Any] = field(default_factory=dict)  # ... and field overrides on top of it
    init_from: str | None = None  # an exported RQ-VAE (model folder) to fine-tune from
    pretrained: str | None = None  # an exported RQ-VAE to use as is: no training
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
    compile: bool = False  # torch.compile the model's forward (and backward); off: eager
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int | None = None  # torch threads; default: Ray's (whole CPUs)
    decode_cpus: float = 0.5  # per Ray Data decode task
    log_every: int = 50
    checkpoint_every: int = 200
    num_to_keep: int = 2
    max_failures: int = 3  # worker failures within a run, each resumed from the last checkpoint
    val_images: int = 64
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def model_config(self) -> RQVAEConfig:
        return RQVAEConfig.preset(self.model_preset, **self.model)

    def preflight(self) -> None:
        """Files this stage will need, checked before any stage of a run starts (and again
        when the stage starts on its own): a missing LPIPS file fails now, not after sharding."""
        if self.loss.perceptual_weight > 0:
            from model.losses import PerceptualLoss

            PerceptualLoss(self.loss.perceptual_weights_path or "")
        require_model_folders(Storage(self.storage), self.section, init_from=self.init_from,
                              pretrained=self.pretrained)  # fmt: skip
        self.tracking.preflight()

    def __post_init__(self) -> None:
        self.model_config()  # unknown presets or keys fail at load time, not mid-run
        if self.pretrained and self.init_from:
            raise ValueError("give pretrained (use a model as is) or init_from (fine-tune "
                             "it), not both")  # fmt: skip
        if self.loss.perceptual_weights_path:  # a local file, opened by the Ray Train workers
            self.loss.perceptual_weights_path = absolute(self.loss.perceptual_weights_path)
        for name in ("steps", "batch_size", "log_every", "grad_accum_steps", "num_workers",
                     "checkpoint_every"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# -- data -----------------------------------------------------------------------------------------


def _to_square(image: Image.Image, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop to resolution (shards may be larger), or resize when smaller."""
    w, h = image.size
    if min(w, h) < resolution:
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
        w = h = resolution
    left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)))


def decode_batch(
    batch: dict[str, Any], resolution: int, random_flip: bool
) -> dict[str, np.ndarray]:
    """Ray Data map: WebDataset rows (image bytes) -> {"image": (B, R, R, 3) uint8}."""
    rng = np.random.default_rng()
    column = next(c for c in IMAGE_EXTENSIONS if c in batch)
    images = []
    for data in batch[column]:
        with Image.open(io.BytesIO(data)) as image:
            pixels = _to_square(image.convert("RGB"), resolution, rng)
        if random_flip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        images.append(pixels)
    return {"image": np.ascontiguousarray(np.stack(images))}


def _split_tars(storage: Storage, shards_dir: str, split: str) -> list[str]:
    return [uri for uri, _ in storage.list_files(shards_dir)
            if uri.rsplit("/", 1)[-1].startswith(f"{split}-") and uri.endswith(".tar")]  # fmt: skip


def train_dataset(storage: Storage, shards_dir: str, config: TrainVAEConfig, resolution: int,
                  resume_step: int = 0):  # fmt: skip
    """Streaming Ray Dataset of decoded, augmented training images; decoding in CPU tasks.
    Its file order is drawn from the seed and the step a resumed run starts from."""
    import ray

    tars = _split_tars(storage, shards_dir, "train")
    if not tars:
        raise FileNotFoundError(f"no train-*.tar shards in {shards_dir}")
    filesystem, _ = storage.arrow_fs(shards_dir)
    paths = [storage.arrow_fs(uri)[1] for uri in tars]
    dataset = ray.data.read_webdataset(paths, filesystem=filesystem, decoder=None,
                                       file_extensions=["tar"],
                                       shuffle=epoch_file_order(resume_seed(config.seed, resume_step)))  # fmt: skip
    return dataset.map_batches(
        decode_batch,
        fn_kwargs={"resolution": resolution, "random_flip": config.random_flip},
        batch_size=64,
        num_cpus=config.decode_cpus,
    )


def validation_images(storage: Storage, shards_dir: str, resolution: int, count: int) -> np.ndarray:
    """Up to `count` held-out images (val shards; the first train shard if there are none)."""
    tars = _split_tars(storage, shards_dir, "val") or _split_tars(storage, shards_dir, "train")[:1]
    images, rng = [], np.random.default_rng(0)
    for uri in tars:
        for _, parts in iter_tar(storage.read_bytes(uri)):
            data = image_member(parts)
            if data is not None:
                with Image.open(io.BytesIO(data)) as image:
                    images.append(_to_square(image.convert("RGB"), resolution, rng))
            if len(images) >= count:
                return np.stack(images)
    return np.stack(images)


def _to_model(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# -- the per-worker loop ------------------------------------------------------------------------


def _save_checkpoint(
    state: VAETrainState, discriminator: torch.nn.Module | None, step: int, directory: str
) -> None:
    save_state({"model": state.model.state_dict()}, directory, "model")
    trainer: dict[str, Any] = {"step": step, "optimizer": state.optimizer.state_dict()}
    if discriminator is not None:
        trainer["discriminator"] = discriminator.state_dict()
        trainer["disc_optimizer"] = state.disc_optimizer.state_dict()
    save_state(trainer, directory, "trainer")


def _load_checkpoint(state: VAETrainState, directory: str) -> int:
    state.model.load_state_dict(load_state(directory, "model")["model"])
    trainer = load_state(directory, "trainer")
    state.optimizer.load_state_dict(trainer["optimizer"])
    if state.disc_optimizer is not None:
        state.loss.discriminator.load_state_dict(trainer["discriminator"])
        state.disc_optimizer.load_state_dict(trainer["disc_optimizer"])
    return int(trainer["step"])


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
    rank, world, device = train_worker_setup(config.threads_per_worker)
    storage = Storage(config.storage)

    state = build_train_state(config)  # same seed on every rank: identical initial weights
    discriminator = state.loss.discriminator  # unwrapped, for checkpoints
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = _load_checkpoint(state, directory)
    elif config.init_from:  # fine-tuning: the exported model's weights, fresh optimizers
        init_from_pretrained(state.model, config.init_from, storage.options(config.init_from))
    state.model.to(device)
    state.loss.to(device)
    for optimizer in (state.optimizer, state.disc_optimizer):
        if optimizer is not None:  # state loaded on CPU follows the parameters to the device
            optimizer.load_state_dict(optimizer.state_dict())
    if world > 1:
        # Codebook buffers stay identical through the quantizer's own all-reduce.
        kwargs = {"broadcast_buffers": False}
        state.forward = ray.train.torch.prepare_model(state.model, parallel_strategy_kwargs=kwargs)
        if state.loss.discriminator is not None:
            state.loss.discriminator = ray.train.torch.prepare_model(
                state.loss.discriminator, parallel_strategy_kwargs=kwargs
            )
    if config.compile:  # the forward and its backward through torch.compile (inductor)
        state.forward = torch.compile(state.model if state.forward is None else state.forward)
    val = _to_model(torch.tensor(loop_config["val_images"])).to(device)  # object store: read-only

    metrics = None
    if rank == 0:
        tracker = open_tracker(config.tracking, run_dir, "train-vae", to_dict(config), storage)
        metrics = RunMetrics(storage, vae_dir, "train-vae", start, tracker)
        if start > 0:
            metrics.write({"step": start, "event": "resumed"})

    def train_step(micro: list[dict[str, Tensor]], step: int) -> tuple[dict[str, float], int]:
        images = [_to_model(batch["image"]) for batch in micro]
        return vae_train_step(state, images, step, config), sum(len(i) for i in images)

    # Model FLOPs of one training image: 3 forwards of encoder, quantizer and decoder.
    flops_per_image = 3 * counted_flops(state.model, val[:1]) if metrics is not None else 0.0

    def log(step: int, terms: dict[str, float]) -> None:
        terms["images_per_s_per_worker"] = terms.pop("rows_per_s_per_worker")
        terms.update(throughput_terms(terms["images_per_s_per_worker"], flops_per_image, device))
        state.model.eval()
        terms["val_psnr"] = psnr(state.model, val)
        state.model.train()
        metrics.write({"step": step, **terms})

    def save(step: int) -> None:
        if metrics is not None:
            grids = [join(vae_dir, "reconstructions.png"),  # the latest, and one per checkpoint
                     join(vae_dir, "reconstructions", f"step-{step:07d}.png")]  # fmt: skip
            for uri in grids:
                reconstruction_grid(state.model, val[:16], uri, storage.options(vae_dir))
            metrics.checkpoint(step, grids[:1])
        report_checkpoint(step, rank,
                          lambda directory: _save_checkpoint(state, discriminator, step, directory))  # fmt: skip

    run_steps(ray.train.get_dataset_shard("train"), config, device, start, rank, train_step,
              log if metrics is not None else lambda step, terms: None, save, torch.uint8)  # fmt: skip
    if metrics is not None:
        state.model.eval().save_pretrained(join(vae_dir, "model"), storage.options(vae_dir))
        metrics.close()


# -- the stage ------------------------------------------------------------------------------------


@single_writer("train-vae", "vae")
def run_train_vae_stage(run_dir: str, config: TrainVAEConfig, overwrite: bool = False) -> Manifest:
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.time()
    run_dir = absolute(run_dir)  # before anything reaches a Ray worker (its own cwd)
    config.preflight()
    storage = Storage(config.storage)
    shards_dir, vae_dir = join(run_dir, "shards"), join(run_dir, "vae")
    shards = require_manifest(storage, shards_dir, "shard")
    resolution = config.model_config().resolution
    _check_shard_size(shards, resolution)

    if config.pretrained:
        return _adopt_pretrained(storage, config, run_dir, shards, overwrite)
    check_one_batch("train-vae", sum(int(u["rows"]) for u in shards.units
                                     if u["name"].startswith("train-")), config)  # fmt: skip
    upstream = {"shard": shards.fingerprint}
    if config.init_from:  # the workers load config.init_from; this process reads init_files
        config.init_from, init_files = model_location(config.init_from)
        upstream["init_from"] = init_from_fingerprint(
            storage, init_files, config.model_config(), "train-vae"
        )
    planned = Manifest("train-vae", FORMAT_VERSION, output_fields(config), upstream)
    finished = begin_stage(storage, vae_dir, planned, overwrite, RESUMABLE_FIELDS)
    if finished is not None:
        return finished
    write_resolved_config(
        storage, join(vae_dir, "config.yaml"), {TrainVAEConfig.section: to_dict(config)}
    )

    trainer = TorchTrainer(
        train_vae_worker,
        train_loop_config={
            "config": config,
            "run_dir": run_dir,
            "val_images": validation_images(storage, shards_dir, resolution, config.val_images),
        },
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=train_run_config(run_dir, "vae", config.max_failures, config.num_to_keep,
                                    storage),
        datasets={"train": train_dataset(storage, shards_dir, config, resolution,
                                         latest_checkpoint_step(storage, vae_dir))},
    )  # fmt: skip
    print(f"train-vae: {config.steps} steps on {config.num_workers} worker(s), "
          f"{shards.counts.get('ok', '?')} images, writing {vae_dir}", flush=True)  # fmt: skip
    trainer.fit()

    model_uri = join(vae_dir, "model")
    weights = storage.fs(join(model_uri, "model.safetensors"))
    planned.units = [{"name": "model/model.safetensors", "rows": config.steps,
                      "bytes": int(weights[0].size(weights[1]))}]  # fmt: skip
    planned.counts = {"steps": config.steps}
    write_manifest(storage, vae_dir, planned)
    print(f"train-vae: done in {time.time() - started:.0f} s; model {model_uri}")
    return planned


def _check_shard_size(shards: Manifest, resolution: int) -> None:
    if shards.config.get("resize_mode") != "none" and shards.config["image_size"] < resolution:
        raise ValueError(f"the shards hold {shards.config['image_size']}px images but the model "
                         f"works at {resolution}px: re-shard with image_size>={resolution}")  # fmt: skip


def _adopt_pretrained(storage: Storage, config: TrainVAEConfig, run_dir: str,
                      shards: Manifest, overwrite: bool) -> Manifest:  # fmt: skip
    """train_vae.pretrained: the exported RQ-VAE becomes RUN/vae/model, as if trained here."""
    vae_dir = join(run_dir, "vae")
    source = model_files(config.pretrained)
    model = RQVAE.from_pretrained(source, storage_options=storage.options(source))
    _check_shard_size(shards, model.config.resolution)
    upstream = {"shard": shards.fingerprint,
                "pretrained": model_fingerprint(storage, source, "train-vae")}  # fmt: skip
    planned = Manifest("train-vae", FORMAT_VERSION, output_fields(config), upstream)
    finished = begin_stage(storage, vae_dir, planned, overwrite)
    if finished is not None:
        return finished
    write_resolved_config(
        storage, join(vae_dir, "config.yaml"), {TrainVAEConfig.section: to_dict(config)}
    )
    model_uri = join(vae_dir, "model")
    model.save_pretrained(model_uri, storage.options(model_uri))
    if storage.exists(join(source, "import.json")):  # where its weights came from
        storage.write_bytes(join(model_uri, "import.json"),
                            storage.read_bytes(join(source, "import.json")))  # fmt: skip
    images = _to_model(torch.from_numpy(validation_images(
        storage, join(run_dir, "shards"), model.config.resolution, 16)))  # fmt: skip
    reconstruction_grid(model, images, join(vae_dir, "reconstructions.png"),
                        storage.options(vae_dir))  # fmt: skip
    planned.units = [{"name": "model/model.safetensors", "rows": 0, "bytes": 0}]
    planned.counts = {"steps": 0, "val_psnr_db": round(psnr(model, images), 2)}
    write_manifest(storage, vae_dir, planned)
    print(f"train-vae: using {config.pretrained} (no training): {planned.counts['val_psnr_db']} "
          f"dB on {len(images)} val images; model {model_uri}")  # fmt: skip
    return planned
