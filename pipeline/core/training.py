"""Pieces every training loop shares: the learning-rate schedule, metrics logs, and the Ray
Train plumbing (run config, checkpoint reporting) of the train-vae and train-ar stages."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


class RunMetrics:
    """metrics.jsonl in a stage's run dir (local or S3), rewritten whole: objects cannot be
    appended to. Picks up the lines of an earlier, resumed attempt."""

    def __init__(self, storage: Any, uri: str, prefix: str) -> None:
        self.storage, self.uri, self.prefix = storage, uri, prefix
        self.lines = storage.read_bytes(uri).decode().splitlines() if storage.exists(uri) else []

    def write(self, record: dict[str, Any]) -> None:
        self.lines.append(json.dumps(record))
        self.storage.write_bytes(self.uri, ("\n".join(self.lines) + "\n").encode())
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in record.items())  # fmt: skip
        print(f"{self.prefix}: {shown}", flush=True)


def epoch_file_order(seed: int):
    """Ray Data's file shuffle for a training dataset: the files (shards, tables) are read in
    an order drawn from (seed, epoch), a new one each epoch. It streams: unlike
    `randomize_block_order`, nothing waits for the whole dataset to be read."""
    from ray.data import FileShuffleConfig

    return FileShuffleConfig(seed=seed, reseed_after_execution=True)


def shuffled_batches(shard: Any, batch_size: int, shuffle_buffer: int, device: Any,
                     dtypes: Any = None) -> Any:  # fmt: skip
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
    )


def report_checkpoint(step: int, rank: int, write: Callable[[str], None]) -> None:
    """Inside a Ray Train loop: every rank reports (a barrier); rank 0 writes the checkpoint
    files with `write(directory)` and hands them to Ray Train."""
    import tempfile

    import ray.train

    if rank != 0:
        ray.train.report({"step": step}, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        write(directory)
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def train_run_config(run_dir: str, name: str, max_failures: int, num_to_keep: int, storage: Any):
    """Ray Train's RunConfig for a stage whose run lives at RUN/{name}: named after the run dir
    so that a re-submitted job resumes from the last committed checkpoint."""
    import os

    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from pipeline.core.storage import is_local

    filesystem, root = storage.arrow_fs(run_dir)
    return RunConfig(
        name=name,
        storage_path=os.path.abspath(root) if is_local(run_dir) else root,
        storage_filesystem=None if is_local(run_dir) else filesystem,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
    )


def train_worker_setup(threads: int | None) -> tuple[int, int, Any]:
    """Inside a Ray Train loop: (rank, world size, torch device), after setting the torch
    threads. Ray gives a worker as many threads as it has whole CPUs (at least 1); on a small
    machine whose data pipeline is light, more threads than reserved CPUs pay."""
    import ray.train
    import ray.train.torch

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()
