"""What the train-vae and train-ar stages share inside their Ray Train workers, around the
optimisation step: the step loop (`run_steps`), the metrics log (`RunMetrics`), the shuffling
and its seeds on resume, the worker setup and checkpoint reporting. What their drivers share
is in core/train_driver.py."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.core.devices import usable_device
from pipeline.core.progress import BatchWait


class RunMetrics:
    """A training stage's metrics, append-only, one JSON record per log (every record has a
    `step`), echoed on the console and forwarded to the experiment tracker.

    - Local run dirs: `metrics.jsonl`, each record appended and flushed as it is logged.
    - Object stores, where nothing can be appended: `metrics/part-{step}.jsonl`, the records
      since the previous checkpoint, written at each `checkpoint`. Bytes uploaded grow
      with the run's length, not its square.
    A run resumed from step S first drops the records past S (logged after the checkpoint it
    resumes from), so the log holds each step once. `read_metrics` reads either layout.
    """

    def __init__(self, storage: Any, stage_dir: str, prefix: str, resume_step: int = 0,
                 tracker: Any = None) -> None:  # fmt: skip
        from pipeline.core.storage import is_local, join

        self.storage, self.stage_dir, self.prefix = storage, stage_dir, prefix
        self.tracker = tracker
        self.local = is_local(stage_dir)
        self.pending: list[str] = []  # object stores: the lines since the last checkpoint
        # Every record so far, in memory: curves.png is drawn from it at each checkpoint. An
        # earlier attempt's start or resume record at the step this run starts from is this
        # run's to write.
        self.records = [r for r in read_metrics(storage, stage_dir) if r["step"] < resume_step
                        or (r["step"] == resume_step and "event" not in r)]  # fmt: skip
        if self.local:
            self.path = storage.fs(join(stage_dir, "metrics.jsonl"))[1]
            storage.write_bytes(join(stage_dir, "metrics.jsonl"),
                                "".join(json.dumps(r) + "\n" for r in self.records).encode())  # fmt: skip
        else:
            for uri in _metric_parts(storage, stage_dir):
                if _part_step(uri) > resume_step:
                    storage.remove_file(uri)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        self.records.append(record)
        if self.local:
            with open(self.path, "a") as f:
                f.write(line)
        else:
            self.pending.append(line)
        if self.tracker is not None:
            self.tracker.log(record)
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in record.items())  # fmt: skip
        # Not print(): Ray Train patches it in its workers into a log call that also tees to
        # the stream, so each line reached the driver twice.
        sys.__stdout__.write(f"{self.prefix}: {shown}\n")
        sys.__stdout__.flush()

    def checkpoint(self, step: int, grids: list[str] = ()) -> None:
        """At the checkpoint of `step`: object stores get the records since the last one;
        curves.png is redrawn; the tracker gets it and the latest `grids` (PNG URIs)."""
        from pipeline.core.storage import join
        from pipeline.core.tracking import plot_curves

        if self.pending:
            self.storage.write_bytes(join(self.stage_dir, "metrics", f"part-{step:09d}.jsonl"),
                                     "".join(self.pending).encode())  # fmt: skip
            self.pending = []
        curves = plot_curves(self.records, f"{self.prefix}: {self.stage_dir}")
        self.storage.write_bytes(join(self.stage_dir, "curves.png"), curves)
        if self.tracker is not None:
            self.tracker.artifact("curves.png", curves)
            for uri in grids:
                self.tracker.artifact(uri.rsplit("/", 1)[-1], self.storage.read_bytes(uri))

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def _metric_parts(storage: Any, stage_dir: str) -> list[str]:
    from pipeline.core.storage import join

    return [u for u, _ in storage.list_files(join(stage_dir, "metrics")) if u.endswith(".jsonl")]


def _part_step(uri: str) -> int:
    return int(uri.rsplit("part-", 1)[1].split(".")[0])


def read_metrics(storage: Any, stage_dir: str) -> list[dict[str, Any]]:
    """Every record of a training stage's metrics log, in order (either layout)."""
    from pipeline.core.storage import join

    parts = sorted(_metric_parts(storage, stage_dir), key=_part_step)
    uris = [join(stage_dir, "metrics.jsonl"), *parts]
    records = []
    for uri in uris:
        if storage.exists(uri):
            text = storage.read_bytes(uri).decode()
            records += [json.loads(line) for line in text.splitlines() if line.strip()]
    return records


# The most read tasks a training dataset gets: Ray Data's own floor (read_op_min_num_blocks)
READ_BLOCKS = 200


def read_blocks(files: int) -> int:
    """The read tasks (blocks) of a training dataset: fixed by its file count. Left to Ray Data,
    the count follows the CPUs the cluster has when the stage starts, and with other block
    boundaries the ranks get other rows and the rows other augmentation seeds: a run on an
    autoscaling cluster trained other weights than the same config on a local instance
    (bench/autoscale.py)."""
    return max(1, min(files, READ_BLOCKS))


def epoch_file_order(seed: int):
    """Ray Data's file shuffle for a training dataset: the files (shards, tables) are read in
    an order drawn from (seed, epoch), a new one each epoch. It streams: unlike
    `randomize_block_order`, nothing waits for the whole dataset to be read."""
    from ray.data import FileShuffleConfig

    return FileShuffleConfig(seed=seed, reseed_after_execution=True)


def shuffled_batches(shard: Any, batch_size: int, shuffle_buffer: int, device: Any,
                     dtypes: Any = None, seed: int | None = None) -> Any:  # fmt: skip
    """One epoch of a Ray Train dataset shard as torch batches, shuffled at both scales: the
    files come in a new order each epoch (`epoch_file_order` in the stage's dataset), and rows
    are drawn from a local buffer of `shuffle_buffer` rows, so one batch mixes many files.
    drop_last: every step sees a full batch."""
    return shard.iter_torch_batches(
        batch_size=batch_size,
        drop_last=True,
        dtypes=dtypes,
        device=device,
        prefetch_batches=2,
        local_shuffle_buffer_size=max(shuffle_buffer, batch_size) if shuffle_buffer > 0 else None,
        local_shuffle_seed=seed,
    )


# -- the step loop both training stages share -----------------------------------------------------
#
# Exact resumption: a run killed anywhere and re-submitted trains the model an uninterrupted run
# trains, bit for bit (same worker count, CPU; docs/architecture.md says what voids it). Nothing
# random depends on how far a process got:
# - the files of epoch e are read in the order Ray Data draws from (seed, e), and every image's
#   crop and flip from (seed, e, block): a resume starts the dataset at its checkpoint's epoch
#   (`start_at_epoch`);
# - rows are shuffled within each rank with a seed of (seed, epoch, rank), and the batches of
#   that epoch already trained on are skipped (the checkpoint's `DataPosition`);
# - every draw a step makes (dropout, label and caption dropout, soft codes, codebook restarts)
#   comes from a generator seeded by (seed, step, rank) (`step_seed`), so no RNG state is saved.


@dataclass
class DataPosition:
    """Where the training data stands at a checkpoint (saved in it as `data`): the epoch, how
    many of its rows every rank has trained on (ranks get equal shares), and on how many ranks
    (0: a checkpoint from before this was recorded, taken as the count resumed on)."""

    epoch: int = 0
    rows: int = 0
    ranks: int = 0

    @classmethod
    def of(cls, trainer: dict[str, Any], batch_size: int = 0) -> DataPosition:
        """From a checkpoint's trainer state (older checkpoints have none: the start; or count
        `batches` of `batch_size` rows)."""
        data = dict(trainer.get("data", {}))
        if "batches" in data:
            data["rows"] = data.pop("batches") * batch_size
        return cls(**data)

    def exact_on(self, ranks: int) -> bool:
        """Whether a resume on `ranks` ranks continues the batch sequence of the run that
        wrote this checkpoint (the same worker count), bit for bit."""
        return self.ranks in (0, ranks)

    def rows_on(self, ranks: int) -> int:
        """The rows of the epoch each of `ranks` ranks skips on resuming: those trained on; on
        another worker count (elastic training), as many rows in all: the epoch goes on at
        the same point, with other rows in each batch."""
        return self.rows if self.exact_on(ranks) else self.rows * self.ranks // ranks


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """The seed of one step's random draws on one rank (`stream` tells generators apart)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1, np.uint64)[0])


def check_data_position(position: DataPosition, start_epoch: int, rank: int,
                        ranks: int) -> bool:  # fmt: skip
    """Inside a Ray Train loop, after loading a checkpoint: the driver started the dataset at
    `start_epoch`, the epoch of the checkpoint it expected the run to resume from. Another
    epoch (a checkpoint committed in between) reads this epoch in another order, and another
    worker count splits it otherwise: training goes on, not bit for bit as an uninterrupted
    run, and says so (docs/architecture.md, "Exact resumption", says what holds instead);
    -> whether the run goes on exactly (the resumed record in metrics.jsonl says it too)."""
    exact = position.epoch == start_epoch and position.exact_on(ranks)
    if rank != 0:
        return exact
    if position.epoch != start_epoch:
        sys.__stdout__.write(f"resumed at epoch {position.epoch}, the dataset started at epoch "
                             f"{start_epoch}: this epoch's data order is another draw, the run "
                             f"is not exact from here\n")  # fmt: skip
    if not position.exact_on(ranks):
        sys.__stdout__.write(f"resumed on {ranks} workers from a checkpoint written by "
                             f"{position.ranks}: the split of the data changes (the global "
                             f"batch too, where num_workers is a count), the run is not exact "
                             f"from here (each worker skips "
                             f"{position.rows_on(ranks)} rows of epoch {position.epoch}, as "
                             f"many in all as were trained on)\n")  # fmt: skip
        sys.__stdout__.flush()
    return exact


def start_at_epoch(dataset: Any, epoch: int) -> Any:
    """`dataset` with its next execution drawing epoch `epoch`'s file order and augmentation.
    Ray Data numbers a dataset's executions in its DataContext and seeds the file shuffle and
    `random()` columns with (seed, execution index); it counts from 0 in a new dataset. Ray
    2.58 keeps the count in a private field, `_execution_idx`: tests/test_train_vae.py's
    augmentation test fails if a Ray upgrade moves it."""
    dataset.context._execution_idx = epoch
    return dataset


def one_view_per_image(batches: Any, epoch: int, views: int, batch_size: int) -> Any:
    """The rows of this epoch's view of each image, in full batches: tables with augmented
    views (encode.views = N) carry a `slot` column, (view - an offset seeded by the image's
    key) mod N, and epoch e keeps the rows whose slot is e mod N, so every image gives one view
    an epoch and each of its N views once in N epochs, in a seeded order of its own. The kept
    rows are re-cut into batches of `batch_size`; the remainder ends the epoch (drop_last)."""
    import torch

    kept: list[dict[str, Any]] = []
    count = 0
    for batch in batches:
        keep = batch["slot"] == epoch % views
        part = {k: v[keep] for k, v in batch.items()}
        kept.append(part)
        count += int(keep.sum())
        while count >= batch_size:
            joined = {k: torch.cat([p[k] for p in kept]) for k in part}
            yield {k: v[:batch_size] for k, v in joined.items()}
            kept = [{k: v[batch_size:] for k, v in joined.items()}]
            count -= batch_size


def step_micro_batches(batches: Any, skip_rows: int, rows: int, micro: int,
                       strict: bool = True) -> Any:  # fmt: skip
    """The batches of one epoch of a rank's stream re-cut into optimizer steps: each step is
    `micro` micro-batches holding `rows` rows in all (sizes differ by at most one), after the
    first `skip_rows` rows (trained on before a resume) -> (micro-batches, rows of the epoch
    consumed). Where the stream's batches already have the micro-batches' size (the count of
    workers the global batch was set for) they pass through untouched; the remainder ends
    the epoch. `strict`: an epoch shorter than `skip_rows` is an error (the data changed)."""
    import torch

    sizes = [rows // micro + (i < rows % micro) for i in range(micro)]
    held: list[dict[str, Any]] = []  # rows not yet in a step, in order
    count, consumed = 0, 0
    for batch in batches:
        size = len(next(iter(batch.values())))
        if skip_rows >= size:
            skip_rows, consumed = skip_rows - size, consumed + size
            continue
        if skip_rows:
            batch = {k: v[skip_rows:] for k, v in batch.items()}
            consumed, size, skip_rows = consumed + skip_rows, size - skip_rows, 0
        held.append(batch)
        count += size
        while count >= rows:
            if [len(next(iter(part.values()))) for part in held[:micro]] == sizes:
                step, held = held[:micro], held[micro:]
            else:
                joined = {k: torch.cat([part[k] for part in held]) for k in batch}
                bounds = list(itertools.accumulate(sizes, initial=0))
                step = [{k: v[a:b] for k, v in joined.items()}
                        for a, b in itertools.pairwise(bounds)]  # fmt: skip
                held = [{k: v[rows:] for k, v in joined.items()}] if count > rows else []
            count, consumed = count - rows, consumed + rows
            yield step, consumed
    if skip_rows and strict:
        raise RuntimeError(f"this worker's share of the epoch has {consumed} rows, fewer than "
                           f"the {consumed + skip_rows} its checkpoint says were trained on: "
                           f"the training data changed since the checkpoint was written")  # fmt: skip


def run_steps(shard: Any, config: Any, device: Any, start: int, rank: int,
              train_step: Callable[[list[Any], int], tuple[dict[str, float], int]],
              log: Callable[[int, dict[str, float]], None],
              checkpoint: Callable[[int, DataPosition], None], dtypes: Any = None,
              views: int = 1, position: DataPosition | None = None,
              ranks: int = 1) -> None:  # fmt: skip
    """Steps `start` -> `config.steps` over epochs of a Ray Train dataset shard (this is
    `rank` of `ranks`), from the data `position` of the checkpoint at `start` (its epoch's
    first rows skipped).

    `train_step(micro_batches, step) -> (terms, rows)` runs one optimizer step on this rank's
    share of the global batch (`TrainerConfig.rows_per_worker`: `grad_accum_steps`
    micro-batches of `batch_size` on the count of workers it was set for, more or fewer on
    others), its random draws seeded by `step_seed`; `log(step, terms)` gets the terms every
    `log_every` steps with `rows_per_s_per_worker` and `data_wait_fraction` (training time
    only) added; `checkpoint(step, position)` runs every `checkpoint_every` steps and at the
    last. `views` > 1: the rows are views of images, one per image and epoch is kept
    (`one_view_per_image`). An epoch that yields no step is an error, never an endless
    loop."""
    import torch

    position = position or DataPosition()
    step, rows, waited, window = start, 0, 0.0, time.time()
    epoch, skip = position.epoch, position.rows_on(ranks)
    step_rows, micro = config.rows_per_worker(ranks)
    watch = BatchWait(rank, config.batch_wait_warning_s)
    try:
        while step < config.steps:
            steps_done, fetch = 0, watch.fetching()
            seed = (config.seed + 7919 * epoch + 104729 * rank) % 2**31
            stream = shuffled_batches(shard, config.batch_size, config.shuffle_buffer, device,
                                      dtypes, seed)  # fmt: skip
            if views > 1:
                stream = one_view_per_image(stream, epoch, views, config.batch_size)
            steps = step_micro_batches(stream, skip, step_rows, micro, position.exact_on(ranks))
            for micro_batches, consumed in steps:
                watch.got()
                steps_done += 1
                waited += time.time() - fetch
                torch.manual_seed(step_seed(config.seed, step, rank))
                terms, used = train_step(micro_batches, step)
                rows, step = rows + used, step + 1
                if step % config.log_every == 0 or step == config.steps:
                    elapsed = time.time() - window
                    log(step, {**terms, "rows_per_s_per_worker": rows / elapsed,
                               "data_wait_fraction": waited / elapsed})  # fmt: skip
                    rows, waited = 0, 0.0
                    window = time.time()  # after logging: validation is not training time
                if step % config.checkpoint_every == 0 or step == config.steps:
                    checkpoint(step, DataPosition(epoch, consumed, ranks))
                    window = time.time()
                if step >= config.steps:
                    return
                fetch = watch.fetching()
            if steps_done == 0 and skip == 0:
                raise RuntimeError(f"worker {rank}: an epoch of the training data gave no full "
                                   f"step of {step_rows} rows: the worker's share of the train "
                                   f"split is smaller than its share of the global batch; lower "
                                   f"batch_size or num_workers")  # fmt: skip
            epoch, skip = epoch + 1, 0
    finally:
        watch.stop()


# Rank 0's checkpoint folders handed to Ray Train and not yet uploaded (Ray deletes each one
# when its upload is done). At most MAX_PENDING_UPLOADS at a time: a bounded queue, so a store
# slower than `checkpoint_every` costs the loop a wait, never unbounded local disk.
_pending_uploads: list[str] = []
MAX_PENDING_UPLOADS = 2


def report_checkpoint(step: int, rank: int, write: Callable[[str], None],
                      every_rank: bool = False) -> None:  # fmt: skip
    """Inside a Ray Train loop: every rank reports (a barrier); rank 0 (or, `every_rank`, each
    rank: a sharded checkpoint's shards, which Ray Train merges into one checkpoint) writes the
    checkpoint files with `write(directory)` into a local folder and hands them to Ray Train,
    which uploads them on its own thread (`CheckpointUploadMode.ASYNC`, Ray >= 2.50): the step
    loop goes on while the files travel to S3, each checked whole once there (an incomplete
    upload fails the worker: core/checkpoint.py). The training function's return waits for
    the last upload, so a stage's export always finds its final checkpoint."""
    import os
    import tempfile

    import ray.train
    from ray.train.v2.api.report_config import CheckpointUploadMode

    if rank != 0 and not every_rank:
        ray.train.report({"step": step}, checkpoint=None,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)  # fmt: skip
        return
    _pending_uploads[:] = [d for d in _pending_uploads if os.path.exists(d)]
    if len(_pending_uploads) >= MAX_PENDING_UPLOADS:
        sys.__stdout__.write(f"step {step}: waiting for {len(_pending_uploads)} checkpoint "
                             f"uploads (storage is slower than checkpoint_every)\n")  # fmt: skip
        while len(_pending_uploads) >= MAX_PENDING_UPLOADS:
            time.sleep(0.05)
            _pending_uploads[:] = [d for d in _pending_uploads if os.path.exists(d)]
    from pipeline.core.checkpoint import verified_checkpoint_upload

    directory = tempfile.mkdtemp(prefix=f"rqpipe-checkpoint-{step}-")
    write(directory)
    _pending_uploads.append(directory)
    ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(directory),
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                     checkpoint_upload_fn=verified_checkpoint_upload)  # fmt: skip


def use_deterministic_kernels() -> None:
    """CUDA kernels that compute the same bits every run, which exact resumption on a GPU
    needs: torch's deterministic algorithms and cuBLAS with a fixed workspace
    (CUBLAS_WORKSPACE_CONFIG, read when this process makes its first cuBLAS handle: call this
    before any CUDA work). An op that has no deterministic kernel warns, naming itself (it
    voids exactness), rather than stopping a run. On CPU, where our kernels are deterministic
    already, it changes nothing."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_worker_setup(threads: int | None, deterministic: bool = False) -> tuple[int, int, Any]:
    """Inside a Ray Train loop: (rank, world size, torch device), after setting the torch
    threads (and, `deterministic`, the kernels: `use_deterministic_kernels`). Ray gives a
    worker as many threads as it has whole CPUs (at least 1); on a small machine whose data
    pipeline is light, more threads than reserved CPUs pay."""
    import logging

    import ray.train
    import ray.train.torch
    from ray.train.v2._internal.execution import context as train_context

    # Ray Train logs each report ("Reporting training result N: ...", one line per checkpoint
    # that says nothing metrics.jsonl does not) through a logger named after its file path,
    # outside `ray.train`, so its own level setting misses it.
    train_context.logger.setLevel(logging.WARNING)
    if deterministic:
        use_deterministic_kernels()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    context = ray.train.get_context()
    # a GPU the node only declares runs on the CPU, or stops here (core/devices.py)
    device = usable_device(ray.train.torch.get_device())
    return context.get_world_rank(), context.get_world_size(), device
