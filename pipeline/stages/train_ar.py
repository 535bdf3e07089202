"""The train-ar stage: the RQ-Transformer trained on RUN/codes/ with Ray Train, written to RUN/ar/.

Data: Ray Data streams the code tables (`train-*.parquet`; `val-*` rows score the validation
loss) to the workers through `get_dataset_shard`. The frozen code embeddings are the codebook
of the RQ-VAE that made the tables: the tables record its fingerprint, and a different VAE is
refused. Labels make the model class-conditional (with label dropout, for classifier-free
guidance); tables without labels train an unconditional model.

Targets: `hard` trains on the stored codes. `soft` follows the paper's stochastic codes: from
each image's stored latents (encode with_latents=true) the codes are re-sampled every step
from q_d = softmax(-||r_{d-1} - e_k||^2 / soft_temperature), and q_d is the target.

RUN/ar/ holds Ray Train's run (checkpoints), `metrics.jsonl` (loss overall and per depth,
validation loss, tokens/s and model TFLOP/s per worker; object stores: `metrics/part-*.jsonl`),
`curves.png`, `samples.png` (a row of samples per class at each checkpoint, decoded with the
VAE), `config.yaml`, and at the end `model/` (safetensors + config.json) and `_manifest.json`.
Resume, extension and `init_from` work as in train-vae.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import numpy as np
import pyarrow.parquet as pq
import torch

from model.flops import rqtransformer_flops_per_sample, throughput_terms
from model.rqtransformer import RQTransformer, RQTransformerConfig
from model.serialization import init_from_pretrained
from model.training import ar_train_step, build_optimizer, soft_quantizer, validation_loss
from pipeline.core.checkpoint import load_state, save_state
from pipeline.core.config import output_fields, to_dict, write_resolved_config
from pipeline.core.lease import single_writer
from pipeline.core.manifest import (
    Manifest,
    begin_stage,
    require_manifest,
    vae_fingerprint,
    write_manifest,
)
from pipeline.core.storage import (
    Storage,
    StorageConfig,
    absolute,
    join,
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
from pipeline.formats.codes_table import CodeTables, inspect_tables, table_to_arrays

FORMAT_VERSION = 1
TARGETS = ("hard", "soft")
DATA_FIELDS = ("code_shape", "codebook_size", "num_classes")  # set by the tables, not the user


@dataclass
class TrainARConfig:
    section: ClassVar[str] = "train_ar"
    execution_fields: ClassVar[tuple[str, ...]] = (
        "vae", "use_gpu", "compile", "cpus_per_worker", "threads_per_worker", "log_every",
        "checkpoint_every", "num_to_keep", "max_failures", "val_rows", "preview_per_class",
        "storage", "tracking",
        "init_from",  # fingerprinted as the model's own fingerprint (upstream "init_from")
    )  # fmt: skip

    model_preset: str = "tiny"  # an RQTransformerConfig preset ...
    model: dict[str, Any] = field(default_factory=dict)  # ... and field overrides on top of it
    init_from: str | None = None  # an exported RQ-Transformer (model folder) to fine-tune from
    targets: str = "hard"  # or "soft": stochastic codes from the tables' latents column
    soft_temperature: float = 0.5  # the paper's value
    steps: int = 2000
    batch_size: int = 64  # per worker
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-4  # matrices only (the official value); not embeddings, norms, biases
    warmup_steps: int = 100
    grad_clip: float = 1.0
    shuffle_buffer: int = 4096  # rows; tables come in a new order each epoch (shuffled_batches)
    seed: int = 0
    grad_accum_steps: int = 1
    num_workers: int = 1
    bf16: bool = True  # autocast on GPU
    compile: bool = False  # torch.compile the model's forward (and backward); off: eager
    vae: str | None = None  # the RQ-VAE whose codebook the tables use; default RUN/vae/model
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int | None = None  # torch threads; default: Ray's (whole CPUs)
    log_every: int = 50
    checkpoint_every: int = 500
    num_to_keep: int = 2
    max_failures: int = 3  # worker failures within a run, each resumed from the last checkpoint
    val_rows: int = 256
    preview_per_class: int = 8  # samples per class in samples.png at each checkpoint; 0: none
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.targets not in TARGETS:
            raise ValueError(f"targets={self.targets!r}: use one of {list(TARGETS)}")
        if self.soft_temperature <= 0:
            raise ValueError(f"soft_temperature must be > 0, got {self.soft_temperature}")
        fixed = sorted(set(self.model) & set(DATA_FIELDS))
        if fixed:
            raise ValueError(f"model.{fixed[0]} comes from the code tables and cannot be set")
        self.model_config([1, 1, 1], 2, 0)  # unknown presets or keys fail at load time
        for name in ("steps", "batch_size", "log_every", "grad_accum_steps", "num_workers",
                     "checkpoint_every"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def preflight(self) -> None:
        """The models this stage will read, checked before any stage of a run starts."""
        require_model_folders(Storage(self.storage), self.section, vae=self.vae,
                              init_from=self.init_from)  # fmt: skip
        self.tracking.preflight()

    def model_config(
        self, code_shape: list[int], codebook_size: int, num_classes: int
    ) -> RQTransformerConfig:
        data = dict(code_shape=code_shape, codebook_size=codebook_size, num_classes=num_classes)
        return RQTransformerConfig.preset(self.model_preset, **{**self.model, **data})


# -- data -----------------------------------------------------------------------------------------


def train_dataset(storage: Storage, tables: CodeTables, columns: list[str], seed: int = 0):
    """Streaming Ray Dataset of the train tables as arrays, the tables in a new seeded order
    each epoch (the seed includes a resumed run's step: core/training.py); the workers'
    shuffle buffer mixes rows across tables (shuffled_batches)."""
    import ray.data

    filesystem, _ = storage.arrow_fs(tables.train[0])
    dataset = ray.data.read_parquet([storage.arrow_fs(u)[1] for u in tables.train],
                                    filesystem=filesystem, shuffle=epoch_file_order(seed))  # fmt: skip
    return dataset.select_columns(columns).map_batches(
        table_to_arrays, batch_format="pyarrow", batch_size=1024,
        fn_kwargs={"code_shape": tables.code_shape, "null_label": tables.num_classes},
    )  # fmt: skip


def validation_rows(storage: Storage, tables: CodeTables, count: int,
                    columns: list[str]) -> dict[str, np.ndarray]:  # fmt: skip
    """Up to `count` held-out rows (the val tables; the first train table if there are none),
    with the columns training reads: codes, label and, for soft targets, latents."""
    arrays: list[dict[str, np.ndarray]] = []
    for uri in tables.val or tables.train[:1]:
        filesystem, path = storage.arrow_fs(uri)
        table = pq.read_table(path, filesystem=filesystem, columns=columns)
        arrays.append(table_to_arrays(table, tables.code_shape, tables.num_classes))
        if sum(len(a["label"]) for a in arrays) >= count:
            break
    return {k: np.concatenate([a[k] for a in arrays])[:count] for k in arrays[0]}


# -- the per-worker loop --------------------------------------------------------------------------


class SamplePreview:
    """A grid of samples, one row per class (or rows of unconditional samples), decoded with
    the RQ-VAE: what training has learned, at each checkpoint."""

    def __init__(self, vae_uri: str, storage: Storage, num_classes: int, per_row: int) -> None:
        from model.rqvae import RQVAE

        self.vae = RQVAE.from_pretrained(vae_uri, storage_options=storage.options(vae_uri)).eval()
        self.rows = min(max(num_classes, 1), 10)
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
            labels = [row] * self.per_row if self.num_classes else None
            codes = model.generate(self.per_row, labels, generator=generator, top_k=64)
            rows.append(self.vae.to(device).decode_codes(codes).clamp(-1, 1))
        model.train(was_training)
        grid = image_grid(rows, scale=max(1, 96 // rows[0].shape[-1]))
        for uri in uris:
            save_png(grid, uri, storage_options)


def _save_checkpoint(model: RQTransformer, optimizer, step: int, directory: str) -> None:
    save_state({"model": model.state_dict()}, directory, "model")
    save_state({"step": step, "optimizer": optimizer.state_dict()}, directory, "trainer")


def _load_checkpoint(model: RQTransformer, optimizer, directory: str) -> int:
    model.load_state_dict(load_state(directory, "model")["model"])
    trainer = load_state(directory, "trainer")
    optimizer.load_state_dict(trainer["optimizer"])
    return int(trainer["step"])


def train_ar_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray.train
    import ray.train.torch

    config: TrainARConfig = loop_config["config"]
    model_config: RQTransformerConfig = loop_config["model_config"]
    run_dir: str = loop_config["run_dir"]
    ar_dir = join(run_dir, "ar")
    rank, world, device = train_worker_setup(config.threads_per_worker)
    storage = Storage(config.storage)
    conditional = model_config.num_classes > 0

    torch.manual_seed(config.seed)  # same seed on every rank: identical initial weights
    code_embeddings = torch.tensor(loop_config["code_embeddings"])  # (books, K, C)
    model = RQTransformer(model_config, code_embeddings)
    optimizer = build_optimizer(model, config)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = _load_checkpoint(model, optimizer, directory)
    elif config.init_from:  # fine-tuning: the exported model's weights, a fresh optimizer
        init_from_pretrained(model, config.init_from, storage.options(config.init_from))
        if not torch.equal(model.code_embeddings, code_embeddings.float()):
            raise ValueError(f"init_from={config.init_from} was trained on the codes of another "
                             f"RQ-VAE than the one that encoded these tables")  # fmt: skip
    model.to(device)
    optimizer.load_state_dict(optimizer.state_dict())  # loaded state follows the parameters
    forward = ray.train.torch.prepare_model(model) if world > 1 else model
    if config.compile:  # the forward and its backward through torch.compile (inductor)
        forward = torch.compile(forward)
    quantizer = (
        soft_quantizer(code_embeddings, model_config.depth).to(device)
        if config.targets == "soft"
        else None
    )
    generator = torch.Generator(device).manual_seed(config.seed * 1000 + rank + start)
    val = {k: torch.tensor(v, device=device) for k, v in loop_config["val"].items()}

    metrics = preview = None
    if rank == 0:
        params = {**to_dict(config), "model": dataclasses.asdict(model_config)}
        tracker = open_tracker(config.tracking, run_dir, "train-ar", params, storage)
        metrics = RunMetrics(storage, ar_dir, "train-ar", start, tracker)
        if config.preview_per_class > 0:
            preview = SamplePreview(loop_config["vae_uri"], storage, model_config.num_classes,
                                    config.preview_per_class)  # fmt: skip
        if start > 0:
            metrics.write({"step": start, "event": "resumed"})
    tokens_per_row = int(np.prod(model_config.code_shape))

    def train_step(micro: list[dict[str, torch.Tensor]], step: int) -> tuple[dict[str, float], int]:
        terms = ar_train_step(forward, optimizer, micro, step, config, conditional, quantizer,
                              generator)  # fmt: skip
        return terms, sum(len(m["codes"]) for m in micro)

    flops_per_row = rqtransformer_flops_per_sample(model_config, code_embeddings.shape[-1])

    def log(step: int, terms: dict[str, float]) -> None:
        rows_per_s = terms.pop("rows_per_s_per_worker")
        terms["tokens_per_s_per_worker"] = rows_per_s * tokens_per_row
        terms.update(throughput_terms(rows_per_s, flops_per_row, device))
        terms.update(validation_loss(model, val, conditional, quantizer, config))
        metrics.write({"step": step, **terms})

    def save(step: int) -> None:
        if metrics is not None:
            grids = []
            if preview is not None:
                grids = [
                    join(ar_dir, "samples.png"),
                    join(ar_dir, "samples", f"step-{step:07d}.png"),
                ]
                preview.write(model, grids, storage.options(ar_dir))
            metrics.checkpoint(step, grids[:1])
        report_checkpoint(step, rank, partial(_save_checkpoint, model, optimizer, step))

    run_steps(ray.train.get_dataset_shard("train"), config, device, start, rank, train_step,
              log if metrics is not None else lambda step, terms: None, save)  # fmt: skip
    if metrics is not None:
        model.eval().save_pretrained(join(ar_dir, "model"), storage.options(ar_dir))
        metrics.close()


# -- the stage ------------------------------------------------------------------------------------


def load_code_embeddings(storage: Storage, vae_uri: str, tables: CodeTables) -> np.ndarray:
    """The VAE's codebook (books, K, C), after checking that it made the tables."""
    from model.rqvae import RQVAE

    if not storage.exists(join(vae_uri, "config.json")):
        raise FileNotFoundError(f"no RQ-VAE at {vae_uri}: the codebook comes from the VAE that "
                                f"encoded the tables; pass vae=URI")  # fmt: skip
    found = vae_fingerprint(storage, vae_uri)
    if found != tables.vae_fingerprint:
        raise ValueError(f"the code tables were encoded with RQ-VAE {tables.vae_fingerprint}, "
                         f"but {vae_uri} is {found}: pass vae=URI of the VAE that encoded them, "
                         f"or re-run encode with this one")  # fmt: skip
    vae = RQVAE.from_pretrained(vae_uri, storage_options=storage.options(vae_uri))
    return vae.quantizer.codebooks.numpy().copy()


@single_writer("train-ar", "ar")
def run_train_ar_stage(run_dir: str, config: TrainARConfig, overwrite: bool = False) -> Manifest:
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.time()
    run_dir = absolute(run_dir)  # before anything reaches a Ray worker (its own cwd)
    config.preflight()
    storage = Storage(config.storage)
    codes_dir, ar_dir = join(run_dir, "codes"), join(run_dir, "ar")
    encoded = require_manifest(storage, codes_dir, "encode")
    tables = inspect_tables(storage, codes_dir, encoded.units)
    check_one_batch("train-ar", tables.train_rows, config)
    model_config = config.model_config(tables.code_shape, tables.codebook_size, tables.num_classes)
    upstream = {"encode": encoded.fingerprint}
    if config.init_from:
        config.init_from = absolute(config.init_from)
        upstream["init_from"] = init_from_fingerprint(storage, config.init_from, model_config,
                                                      "train-ar")  # fmt: skip
    planned = Manifest("train-ar", FORMAT_VERSION, output_fields(config), upstream)
    finished = begin_stage(storage, ar_dir, planned, overwrite, RESUMABLE_FIELDS)
    if finished is not None:
        return finished

    if config.targets == "soft" and not tables.has_latents:
        raise ValueError(f"targets=soft needs the latents column in {codes_dir}: re-run encode "
                         f"with with_latents=true (and --overwrite), or use targets=hard")  # fmt: skip
    vae_uri = absolute(config.vae or join(run_dir, "vae", "model"))
    code_embeddings = load_code_embeddings(storage, vae_uri, tables)
    write_resolved_config(
        storage,
        join(ar_dir, "config.yaml"),
        {TrainARConfig.section: to_dict(config), "model": dataclasses.asdict(model_config)},
    )

    columns = ["codes", "label"] + (["latents"] if config.targets == "soft" else [])
    trainer = TorchTrainer(
        train_ar_worker,
        train_loop_config={
            "config": config,
            "model_config": model_config,
            "run_dir": run_dir,
            "vae_uri": vae_uri,
            "code_embeddings": code_embeddings,
            "val": validation_rows(storage, tables, config.val_rows, columns),
        },
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=train_run_config(run_dir, "ar", config.max_failures, config.num_to_keep,
                                    storage),
        datasets={"train": train_dataset(storage, tables, columns,
                                         resume_seed(config.seed, latest_checkpoint_step(storage, ar_dir)))},
    )  # fmt: skip
    kind = f"{tables.num_classes} classes" if tables.num_classes else "unconditional"
    print(f"train-ar: {config.steps} steps on {config.num_workers} worker(s), {tables.rows:,} "
          f"code stacks {tables.code_shape} (K={tables.codebook_size}, {kind}, "
          f"{config.targets} targets), writing {ar_dir}", flush=True)  # fmt: skip
    trainer.fit()

    weights = join(ar_dir, "model", "model.safetensors")
    fs, path = storage.fs(weights)
    planned.units = [{"name": "model/model.safetensors", "rows": config.steps,
                      "bytes": int(fs.size(path))}]  # fmt: skip
    planned.counts = {"steps": config.steps, "num_classes": tables.num_classes,
                      "train_rows": tables.rows}  # fmt: skip
    write_manifest(storage, ar_dir, planned)
    print(f"train-ar: done in {time.time() - started:.0f} s; model {join(ar_dir, 'model')}")
    return planned
