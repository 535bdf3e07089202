"""The train-vae stage: the RQ-VAE trained on RUN/shards/ with Ray Train, written to RUN/vae/.

RUN/vae/ holds Ray Train's run (checkpoints: model, discriminator, optimizers, step, codebook EMA
state, all as safetensors + JSON), `metrics.jsonl` (object stores: `metrics/part-*.jsonl`),
`curves.png`, `reconstructions.png` (originals above, depth 1..D below; one per checkpoint too),
`config.yaml`, and at the end `model/` (save_pretrained) and `_manifest.json`. The Ray Train run
is named after the run dir, so a re-submitted run resumes from its last checkpoint, with the
config it was started with (`steps` may rise: an extension); after a failed worker the stage
starts a new Ray Train run from the last checkpoint (`max_failures`, 3: core/train_driver.py). `init_from` starts from an
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
from pipeline.core.config import output_fields
from pipeline.core.lease import single_writer
from pipeline.core.manifest import Manifest, model_fingerprint
from pipeline.core.stage_folder import StageFolder
from pipeline.core.storage import (
    Storage,
    StorageConfig,
    absolute,
    join,
    model_files,
    require_model_folders,
)
from pipeline.core.train_driver import (
    RESUMABLE_FIELDS,
    TRAINER_FIELDS,
    TrainerConfig,
    add_init_from,
    check_init_from,
    check_one_batch,
    finish_training,
    fit,
)
from pipeline.stages.train_vae.data import train_dataset, validation_images
from pipeline.stages.train_vae.worker import pixels_to_model, reconstruction_grid, train_vae_worker

__all__ = ["TrainVAEConfig", "reconstruction_grid", "run_train_vae_stage", "validation_images"]

FORMAT_VERSION = 1


@dataclass
class TrainVAEConfig(TrainerConfig):
    section: ClassVar[str] = "train_vae"
    # Execution knobs: where and how fast, not what is learned (not fingerprinted).
    execution_fields: ClassVar[tuple[str, ...]] = (
        *TRAINER_FIELDS, "decode_cpus", "val_images", "storage",
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
    decode_cpus: float = 0.5  # per Ray Data decode task
    checkpoint_every: int = 200
    val_images: int = 64
    storage: StorageConfig = field(default_factory=StorageConfig)

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
        super().__post_init__()
        self.model_config()  # unknown presets or keys fail at load time, not mid-run
        if self.pretrained and self.init_from:
            raise ValueError("give pretrained (use a model as is) or init_from (fine-tune "
                             "it), not both")  # fmt: skip
        if self.loss.perceptual_weights_path:  # a local file, opened by the Ray Train workers
            self.loss.perceptual_weights_path = absolute(self.loss.perceptual_weights_path)


@single_writer("train-vae")
def run_train_vae_stage(run_dir: str, config: TrainVAEConfig, overwrite: bool = False) -> Manifest:
    started = time.time()
    config.preflight()
    vae = StageFolder(run_dir, "train-vae", config.storage)
    shards = vae.upstream("shard")
    resolution = config.model_config().resolution
    _check_shard_size(shards, resolution)

    if config.pretrained:
        return _adopt_pretrained(vae, config, shards, overwrite)
    check_one_batch("train-vae", sum(int(u["rows"]) for u in shards.units
                                     if u["name"].startswith("train-")), config)  # fmt: skip
    upstream = {"shard": shards.fingerprint}
    add_init_from(vae, config, upstream)
    check_init_from(vae, config, config.model_config())
    planned = Manifest("train-vae", FORMAT_VERSION, output_fields(config), upstream)
    if (finished := vae.begin(planned, overwrite, config, RESUMABLE_FIELDS)) is not None:
        return finished

    shards_dir = vae.of("shard").uri
    loop_config = {"config": config, "run_dir": vae.run_dir,
                   "val_images": validation_images(vae.storage, shards_dir, resolution,
                                                   config.val_images)}  # fmt: skip
    dataset = train_dataset(vae.storage, shards_dir, config, resolution)
    print(f"train-vae: {config.steps} steps on {config.workers_text()}, "
          f"{shards.counts.get('ok', '?')} images, writing {vae.uri}", flush=True)  # fmt: skip
    fit(vae, train_vae_worker, loop_config, config, dataset)
    return finish_training(vae, planned, config, started)


def _check_shard_size(shards: Manifest, resolution: int) -> None:
    if shards.config.get("resize_mode") != "none" and shards.config["image_size"] < resolution:
        raise ValueError(f"the shards hold {shards.config['image_size']}px images but the model "
                         f"works at {resolution}px: re-shard with image_size>={resolution}")  # fmt: skip


def _adopt_pretrained(vae: StageFolder, config: TrainVAEConfig, shards: Manifest,
                      overwrite: bool) -> Manifest:  # fmt: skip
    """train_vae.pretrained: the exported RQ-VAE becomes RUN/vae/model, as if trained here."""
    storage = vae.storage
    source = model_files(config.pretrained)
    model = RQVAE.from_pretrained(source, storage_options=storage.options(source))
    _check_shard_size(shards, model.config.resolution)
    upstream = {"shard": shards.fingerprint,
                "pretrained": model_fingerprint(storage, source, "train-vae")}  # fmt: skip
    planned = Manifest("train-vae", FORMAT_VERSION, output_fields(config), upstream)
    if (finished := vae.begin(planned, overwrite, config)) is not None:
        return finished
    model_uri = vae.path("model")
    model.save_pretrained(model_uri, storage.options(model_uri))
    if storage.exists(join(source, "import.json")):  # where its weights came from
        storage.write_bytes(vae.path("model", "import.json"),
                            storage.read_bytes(join(source, "import.json")))  # fmt: skip
    images = pixels_to_model(torch.from_numpy(validation_images(
        storage, vae.of("shard").uri, model.config.resolution, 16)))  # fmt: skip
    reconstruction_grid(model, images, vae.path("reconstructions.png"), storage.options(vae.uri))
    planned.units = [{"name": "model/model.safetensors", "rows": 0, "bytes": 0}]
    planned.counts = {"steps": 0, "val_psnr_db": round(psnr(model, images), 2)}
    vae.finish(planned)
    print(f"train-vae: using {config.pretrained} (no training): {planned.counts['val_psnr_db']} "
          f"dB on {len(images)} val images; model {model_uri}")  # fmt: skip
    return planned
