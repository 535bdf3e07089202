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

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from model.losses import VAELossConfig
from model.rqvae import RQVAE, RQVAEConfig
from model.training import psnr
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
from pipeline.core.tracking import TrackingConfig
from pipeline.core.training import (
    RESUMABLE_FIELDS,
    check_one_batch,
    init_from_fingerprint,
    latest_checkpoint_step,
    ordered_data_config,
    train_run_config,
)
from pipeline.stages.train_vae.data import train_dataset, validation_images
from pipeline.stages.train_vae.worker import pixels_to_model, reconstruction_grid, train_vae_worker

__all__ = ["TrainVAEConfig", "reconstruction_grid", "run_train_vae_stage", "validation_images"]

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
        dataset_config=ordered_data_config(),  # reproducible: the same run trains the same model
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
    images = pixels_to_model(torch.from_numpy(validation_images(
        storage, join(run_dir, "shards"), model.config.resolution, 16)))  # fmt: skip
    reconstruction_grid(model, images, join(vae_dir, "reconstructions.png"),
                        storage.options(vae_dir))  # fmt: skip
    planned.units = [{"name": "model/model.safetensors", "rows": 0, "bytes": 0}]
    planned.counts = {"steps": 0, "val_psnr_db": round(psnr(model, images), 2)}
    write_manifest(storage, vae_dir, planned)
    print(f"train-vae: using {config.pretrained} (no training): {planned.counts['val_psnr_db']} "
          f"dB on {len(images)} val images; model {model_uri}")  # fmt: skip
    return planned
