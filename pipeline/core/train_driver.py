"""What the train-vae and train-ar stages' drivers share around Ray Train: the knobs of the
trainer (`TrainerConfig`, inherited by both stage configs), the plan-time checks (one global
batch, `init_from`'s architecture), the Ray Train run (named after the run dir, so a
re-submitted job resumes; blocks in the seeded order, so one config trains one model) and the
manifest of the exported model. What runs inside the workers is core/training.py."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.checkpoint import state_fields
from pipeline.core.devices import train_backend
from pipeline.core.manifest import Manifest, model_fingerprint
from pipeline.core.stage_folder import StageFolder
from pipeline.core.storage import Storage, is_local, join, model_location
from pipeline.core.tracking import TrackingConfig
from pipeline.core.training import DataPosition, read_metrics, start_at_epoch

# Training-config fields that may change when a stage resumes or is extended (begin_stage):
# more steps (the cosine schedule is then recomputed for the new total) and another number of
# workers (a fixed count sets the global batch, which then changes from the resumed step on;
# a range keeps it: `TrainerConfig.global_batch`).
RESUMABLE_FIELDS = ("steps", "num_workers")
# Ray Train's names of checkpoint folders: checkpoint_<date>_<time>.<microseconds>
CHECKPOINT_FOLDER = re.compile(r"checkpoint_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d+$")
# Where and how fast a stage trains, not what it learns: execution fields (not fingerprinted)
# of both training configs.
TRAINER_FIELDS = ("use_gpu", "compile", "deterministic", "cpus_per_worker", "threads_per_worker",
                  "log_every", "checkpoint_every", "num_to_keep", "max_failures",
                  "batch_wait_warning_s", "resize_interval_s", "tracking")  # fmt: skip


@dataclass
class TrainerConfig:
    """The Ray Train knobs of a training stage; TrainVAEConfig and TrainARConfig inherit them,
    so the keys stay flat (`train_ar.num_workers=32`)."""

    # The learning rate after the stage's warmup_steps: "cosine" or "linear" decay to
    # final_lr_ratio x lr at the last step, or "constant" (model/training.py lr_multiplier).
    lr_decay: str = "cosine"
    final_lr_ratio: float = 0.1
    # > 0: an exponential moving average of the weights (model/training.py WeightEMA), updated
    # every step and checkpointed; the stage exports it as model/ (the raw weights: model-raw/).
    ema_decay: float = 0.0
    # A count, or a range [min, max] (elastic training: Ray Train starts on as many workers as
    # the cluster holds, at least min, and resizes to the cluster every resize_interval_s,
    # resuming from the latest checkpoint). The global batch is batch_size x grad_accum_steps
    # x the count (the max of a range), whatever the number of workers up: `global_batch`.
    num_workers: int | list[int] = 1
    resize_interval_s: float = 60.0  # a range: how often Ray Train compares the cluster with it
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int | None = None  # torch threads; default: Ray's (whole CPUs)
    bf16: bool = True  # autocast on GPU
    compile: bool = False  # torch.compile the model's forward (and backward); off: eager
    # CUDA kernels that give the same bits every run (torch.use_deterministic_algorithms,
    # CUBLAS_WORKSPACE_CONFIG): exact resumption on GPUs, at a cost bench/gpu.sh measures
    deterministic: bool = False
    log_every: int = 50
    checkpoint_every: int = 500
    num_to_keep: int = 2
    max_failures: int = 3  # worker failures a stage survives, each resumed from the last checkpoint
    # a worker that waits this long for a training batch says so, with what the cluster has free
    batch_wait_warning_s: float = 300.0
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        from model.training import LR_DECAYS

        self._check_num_workers()
        if self.resize_interval_s <= 0:
            raise ValueError(f"resize_interval_s must be > 0, got {self.resize_interval_s}")
        for name in ("steps", "batch_size", "log_every", "grad_accum_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay={self.lr_decay!r}: use one of {list(LR_DECAYS)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")

    def _check_num_workers(self) -> None:
        workers = self.num_workers
        if isinstance(workers, list):
            if len(workers) != 2 or not 1 <= workers[0] <= workers[1]:
                raise ValueError(f"num_workers={workers}: a range is [min, max] with "
                                 f"1 <= min <= max, e.g. [1, 8]; or give a count")  # fmt: skip
        elif workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {workers}")

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers: a count n is (n, n)."""
        workers = self.num_workers
        return (workers[0], workers[1]) if isinstance(workers, list) else (workers, workers)

    @property
    def elastic(self) -> bool:
        return self.worker_range[0] < self.worker_range[1]

    @property
    def global_batch(self) -> int:
        """Rows an optimizer step trains on, on any number of workers n: each takes
        global_batch // n of them (in ceil(that / batch_size) micro-batches), so the step, the
        lr schedule and the loss do not depend on n. Where n does not divide it, the step
        trains on n x (global_batch // n): fewer by less than n rows."""
        return self.batch_size * self.grad_accum_steps * self.worker_range[1]

    def workers_text(self) -> str:
        low, high = self.worker_range
        if low == high:
            return f"{low} worker(s)"
        return f"{low}-{high} workers (elastic, global batch {self.global_batch})"

    def rows_per_worker(self, workers: int) -> tuple[int, int]:
        """On `workers` workers: (rows each trains on in a step, micro-batches they make)."""
        rows = self.global_batch // workers
        return rows, -(-rows // self.batch_size)


def check_one_batch(stage: str, train_rows: int, config: Any) -> None:
    """Refuse at plan time a train split smaller than one global batch: with drop_last, no
    worker would ever get a full batch."""
    workers = config.worker_range[1]
    needed = config.batch_size * workers
    if train_rows < needed:
        raise ValueError(f"{stage}: the train split has {train_rows} rows, fewer than one global "
                         f"batch (batch_size {config.batch_size} x num_workers "
                         f"{workers} = {needed}): lower batch_size to at most "
                         f"{max(1, train_rows // workers)}, or add data")  # fmt: skip


def add_init_from(folder: StageFolder, config: Any, upstream: dict[str, str]) -> None:
    """`init_from` (an exported model to fine-tune from): its identity added to `upstream`,
    and the config pointed at the URI the workers load (a Hub model as given, a local path
    made absolute). Its architecture is checked by `check_init_from`."""
    if not config.init_from:
        return
    config.init_from, files = model_location(config.init_from)
    if not folder.storage.exists(join(files, "config.json")):
        raise FileNotFoundError(f"init_from={config.init_from}: no exported model there (a model "
                                f"folder with config.json + model.safetensors, e.g. "
                                f"RUN/vae/model)")  # fmt: skip
    upstream["init_from"] = model_fingerprint(folder.storage, files, folder.stage)


def check_init_from(folder: StageFolder, config: Any, expected: Any) -> None:
    """`init_from`'s model has the architecture `expected` (the stage's model config)."""
    from model.weights.serialization import architecture_changes

    if not config.init_from:
        return
    files = model_location(config.init_from)[1]
    found = json.loads(folder.storage.read_bytes(join(files, "config.json")))["config"]
    changes = architecture_changes(found, expected)
    if changes:
        raise ValueError(f"init_from={config.init_from} is a model of another architecture "
                         f"({'; '.join(changes)}): set model_preset / model.* to match it")  # fmt: skip


def _checkpoint_snapshot(storage: Storage, stage_dir: str) -> dict[str, Any]:
    """Ray Train's record of a run's committed checkpoints ({} before the first)."""
    uri = join(stage_dir, "checkpoint_manager_snapshot.json")
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}


def resume_position(storage: Storage, stage_dir: str) -> DataPosition:
    """The data position of the checkpoint a re-submitted stage resumes from: the one Ray
    Train's snapshot names as its latest committed (the start if none). Not the newest
    checkpoint folder: a driver killed mid-upload leaves one Ray Train never committed."""
    latest = _checkpoint_snapshot(storage, stage_dir).get("latest_checkpoint_result")
    if not latest:
        return DataPosition()
    trainer = json.loads(storage.read_bytes(join(stage_dir, latest["checkpoint_dir_name"],
                                                 "trainer.json")))  # fmt: skip
    if "__dict__" in trainer:  # core/checkpoint.py's layout (DDP); else core/fsdp.py's
        trainer = state_fields(trainer)
    return DataPosition.of(trainer)


def remove_uncommitted_checkpoints(storage: Storage, stage_dir: str) -> list[str]:
    """Remove the checkpoint folders Ray Train's snapshot does not name, before a run starts;
    -> their names. A driver or worker killed mid-upload leaves a partial folder that no run
    reads and that Ray Train, which deletes only what it committed (num_to_keep), never
    removes: the fault soak found one beside a finished model."""
    snapshot = _checkpoint_snapshot(storage, stage_dir)
    results = [*snapshot.get("checkpoint_results", []), snapshot.get("latest_checkpoint_result")]
    committed = {result["checkpoint_dir_name"] for result in results if result}
    removed = []
    for uri in storage.glob(join(stage_dir, "checkpoint_*")):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if CHECKPOINT_FOLDER.match(name) and name not in committed:
            storage.remove_tree(uri)
            removed.append(name)
    return removed


def ordered_data_config():
    """Ray Train's DataConfig with `preserve_order`: Ray Data hands the blocks over in the
    seeded file order, not as its read tasks finish. Without it two train-ar runs of one config
    trained different weights; with it the same weights bit for bit (one worker; tested)."""
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    # DataConfig.default_ingest_options() but for preserve_order; it also copies the deprecated
    # exclude_resources, which prints a RayDeprecationWarning into the driver's console
    current = DataContext.get_current().execution_options
    options = ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True,
                               verbose_progress=current.verbose_progress)  # fmt: skip
    return DataConfig(execution_options=options)


def train_run_config(run_dir: str, name: str, num_to_keep: int, storage: Any):
    """Ray Train's RunConfig for a stage whose run lives at RUN/{name}: named after the run dir
    so that a re-submitted job (or `fit`'s next run after a failure) resumes from the last
    committed checkpoint. No restarts within a run (`fit` says why)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    filesystem, root = storage.arrow_fs(run_dir)
    return RunConfig(
        name=name,
        storage_path=os.path.abspath(root) if is_local(run_dir) else root,
        storage_filesystem=None if is_local(run_dir) else filesystem,
        failure_config=FailureConfig(max_failures=0),
        checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        logging_config=LoggingConfig(log_level="WARNING"),  # its INFO lines: Ray's log files
    )


def fit(folder: StageFolder, worker: Any, loop_config: dict[str, Any], config: TrainerConfig,
        dataset: Any) -> None:  # fmt: skip
    """Run `worker` (Ray Train's train_loop_per_worker) on `config.num_workers` workers over
    `dataset`, checkpointing into the stage folder; returns when training is done. A range of
    workers is Ray Train's elastic training: it resizes the worker group to the cluster, each
    time resuming from the latest checkpoint (a loss of a worker's node is a failure, below).

    Each Ray Train run starts the dataset at the epoch of the checkpoint it resumes from
    (exact resumption: core/training.py). So a failed worker (a lost node, a killed process)
    ends the run, and a new run resumes from the last committed checkpoint, at most
    `max_failures` times: Ray Train's own restart (FailureConfig) would re-read the data from
    the epoch the run started at, and train another model than an uninterrupted run."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError

    name = folder.uri.rstrip("/").rsplit("/", 1)[-1]
    for failures in range(config.max_failures + 1):
        for removed in remove_uncommitted_checkpoints(folder.storage, folder.uri):
            print(f"{folder.stage}: removed {removed}, a checkpoint never committed (its upload "
                  f"was cut)", flush=True)  # fmt: skip
        position = resume_position(folder.storage, folder.uri)
        trainer = TorchTrainer(
            worker,
            train_loop_config={**loop_config, "start_epoch": position.epoch},
            scaling_config=ScalingConfig(num_workers=config.worker_range if config.elastic
                                         else config.worker_range[0], use_gpu=config.use_gpu,
                                         resources_per_worker={"CPU": config.cpus_per_worker},
                                         elastic_resize_monitor_interval_s=config.resize_interval_s),
            run_config=train_run_config(folder.run_dir, name, config.num_to_keep, folder.storage),
            datasets={"train": start_at_epoch(dataset, position.epoch)},
            dataset_config=ordered_data_config(),  # the same run trains the same model
            torch_config=TorchConfig(backend=train_backend(config.use_gpu)),
        )  # fmt: skip
        try:
            trainer.fit()
            return
        except TrainingFailedError as error:
            if failures == config.max_failures:
                raise
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            print(f"{folder.stage}: a worker failed ({type(error).__name__}: {first}); "
                  f"resuming from the last checkpoint (failure {failures + 1} of "
                  f"max_failures {config.max_failures})", flush=True)  # fmt: skip


def finish_training(folder: StageFolder, planned: Manifest, config: Any, started: float,
                    **counts: Any) -> Manifest:  # fmt: skip
    """The manifest of a trained stage: its exported model as the unit, the steps, the worker
    counts it trained on ([[from step, workers], ...]: the start and every resize) and
    `counts`; written last. A resume on the same count is no entry: a fault costs time, and
    the manifest of a faulted run is the uninterrupted run's (the fault soak compares them)."""
    planned.units = [{"name": "model/model.safetensors", "rows": config.steps,
                      "bytes": folder.size("model", "model.safetensors")}]  # fmt: skip
    workers: list[list[int]] = []
    for record in read_metrics(folder.storage, folder.uri):
        sized = record.get("event") in ("started", "resumed")
        if sized and (not workers or workers[-1][1] != record["workers"]):
            workers.append([record["step"], record["workers"]])
    planned.counts = {"steps": config.steps, "workers": workers, **counts}
    folder.finish(planned)
    print(f"{folder.stage}: done in {time.time() - started:.0f} s; model {folder.path('model')}")
    return planned
