import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from model.rqvae import RQVAE
from pipeline.core.config import load_config
from pipeline.core.manifest import StageConflict
from pipeline.core.storage import Storage
from pipeline.demo.data import write_demo_dataset
from pipeline.stages.shard import ShardConfig, run_shard_stage
from pipeline.stages.train_vae import TrainVAEConfig, run_train_vae_stage, validation_images
from tests.train_helpers import committed_checkpoints, same_results
from tests.train_helpers import metrics as stage_metrics

pytestmark = pytest.mark.slow  # end to end: whole stages on Ray (make test-fast skips them)

REPO = Path(__file__).resolve().parents[1]
SHARDING = dict(image_size=32, samples_per_shard=32, val_fraction=0.1, cpus_per_task=0.5)


def train_config(**kw) -> TrainVAEConfig:
    values = dict(steps=24, batch_size=8, lr=2e-3, warmup_steps=2, num_workers=2,
                  cpus_per_worker=0.5, log_every=4, checkpoint_every=8, val_images=16)  # fmt: skip
    values.update(kw)
    config = TrainVAEConfig(**values)
    config.loss.gan_weight = 0.0
    config.tracking.backend = "none"  # MLflow's tables cost seconds a run: tests/test_long_runs.py
    return config


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "in"
    write_demo_dataset(root, per_class=24)
    return root


def sharded_run(demo_images, run_dir: str) -> str:
    run_shard_stage(str(demo_images), run_dir, ShardConfig(**SHARDING))
    return run_dir


def metrics(run: Path) -> list[dict]:
    return stage_metrics(run / "vae")


def _checkpoints(run: Path) -> list[str]:
    return committed_checkpoints(run / "vae")


def test_augmentation_is_drawn_anew_each_epoch_and_reproducibly(ray_local, demo_images, tmp_path,
                                                                monkeypatch):  # fmt: skip
    """Crops (40px shards, a 32px model), flips and file order come from the seed: a fresh
    dataset of one config gives the same images; its next epoch, and another seed, do not."""
    from ray.data import DataContext

    from pipeline.core.training import start_at_epoch
    from pipeline.stages.train_vae.data import train_dataset

    # as in training (ordered_data_config): rows in the seeded file order, not as tasks finish
    monkeypatch.setattr(DataContext.get_current().execution_options, "preserve_order", True)

    run = tmp_path / "run"
    run_shard_stage(str(demo_images), str(run), ShardConfig(**{**SHARDING, "image_size": 40}))
    storage = Storage()

    def epochs(seed: int, count: int) -> list[np.ndarray]:
        dataset = train_dataset(storage, str(run / "shards"), train_config(seed=seed), 32)
        return [np.stack([row["image"] for row in dataset.take_all()]) for _ in range(count)]

    first, second = epochs(0, 2)
    assert first.shape[1:] == (32, 32, 3)
    assert np.array_equal(epochs(0, 1)[0], first), "one seed, one epoch: the same images"
    # what a resume at epoch 1 reads: a new dataset started there gives the second epoch
    resumed = train_dataset(storage, str(run / "shards"), train_config(seed=0), 32)
    rows = start_at_epoch(resumed, 1).take_all()
    assert np.array_equal(np.stack([row["image"] for row in rows]), second)
    for other in (second, epochs(1, 1)[0]):
        # a new draw of the file order, the crops and the flips
        assert len(other) == len(first) and not np.array_equal(other, first)


def _ray_train_workers(since: float) -> list[psutil.Process]:
    """Ray Train workers of this test's run: our own Ray instance's, started after `since`."""
    ours = psutil.Process(os.getpid()).children(recursive=True)
    return [p for p in ours if p.create_time() >= since
            and " ".join(p.cmdline()).startswith("ray::RayTrainWorker")]  # fmt: skip


def test_a_killed_worker_and_driver_then_resubmitted_train_the_uninterrupted_model(
        ray_local, demo_images, tmp_path):  # fmt: skip
    """Exact resumption, through both kinds of failure: `jobs/train_vae.py`, DDP on two
    workers (5 batches an epoch each); one worker SIGKILLed once the second checkpoint (step 8,
    in the second epoch) is committed (the stage starts a new Ray Train run from it:
    max_failures), then the driver SIGKILLed at a random moment after the new run's first
    checkpoint; the same command resumes and exports
    the weights of an uninterrupted run of the config, bit for bit, with the same figures at
    every step logged after the resume, each step logged once. The run learns and exports;
    another lr on the unfinished run is refused, naming it; the finished command is a no-op.
    The uninterrupted run also averages the weights (ema_decay), which changes nothing of
    training: its model-raw/ is what is compared, its model/ is the average."""
    shards = Path(sharded_run(demo_images, str(tmp_path / "shards")))
    run, reference = tmp_path / "run", tmp_path / "reference"
    for folder in (run, reference):
        shutil.copytree(shards, folder)
    overrides = ["steps=20", "batch_size=8", "lr=2e-3", "warmup_steps=2", "num_workers=2",
                 "cpus_per_worker=0.5", "checkpoint_every=4", "log_every=4",
                 "loss.gan_weight=0", "val_images=16", "tracking.backend=none"]  # fmt: skip
    address = ray_local.get_runtime_context().gcs_address
    command = [sys.executable, str(REPO / "jobs" / "train_vae.py"), "--run-dir", str(run),
               "--ray-address", address, *overrides]  # fmt: skip
    started = time.time()
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    deadline = time.time() + 180
    while len(_checkpoints(run)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    first = set(_checkpoints(run))
    workers = _ray_train_workers(since=started)
    assert len(workers) == 2, [w.cmdline() for w in workers]
    workers[-1].kill()  # SIGKILL one worker of our own Ray instance, by its pid
    while set(_checkpoints(run)) <= first and time.time() < deadline:
        time.sleep(0.05)
    delay = random.uniform(0.0, 1.0)  # anywhere before the next checkpoint, or past it
    print(f"killing the driver {delay:.2f} s after the restarted group's first checkpoint")
    time.sleep(delay)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (run / "vae" / "_manifest.json").exists()
    # What a driver killed mid-upload leaves: a partial checkpoint folder Ray Train never
    # committed; the resumed stage removes it.
    orphan = run / "vae" / "checkpoint_2026-01-01_00-00-00.000000"
    orphan.mkdir()
    (orphan / "model.json").write_text("{}")

    # Another lr on the unfinished run is refused, naming it; the killed driver's lease is
    # taken over at once (its pid is gone from this host).
    with pytest.raises(StageConflict, match=r"unfinished train-vae output made with another "
                                            r"config: lr: 0\.002 -> 0\.001"):  # fmt: skip
        run_train_vae_stage(str(run),
                            load_config(TrainVAEConfig, None, [*overrides, "lr=0.001"]))  # fmt: skip
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logged = metrics(run)
    events = [m["step"] for m in logged if m.get("event") == "resumed"]
    assert len(events) == 2 and events[0] == 8 and events[1] >= 12, events  # the worker, the driver
    records = [m for m in logged if "event" not in m]
    assert [m["step"] for m in records] == [4, 8, 12, 16, 20]  # each once
    assert {"recon", "commitment", "perplexity_d4", "images_per_s_per_worker",
            "data_wait_fraction"} <= set(records[0])  # fmt: skip
    assert (run / "vae" / "reconstructions.png").exists()
    assert (run / "vae" / "config.yaml").exists()
    assert not orphan.exists() and "a checkpoint never committed" in resumed.stdout
    manifest = json.loads((run / "vae" / "_manifest.json").read_text())
    assert manifest["upstream"]["shard"] == json.loads(
        (run / "shards" / "_manifest.json").read_text())["fingerprint"]  # fmt: skip
    finished = (run / "vae" / "_manifest.json").read_bytes()
    run_train_vae_stage(str(run), load_config(TrainVAEConfig, None, overrides))  # up to date
    assert (run / "vae" / "_manifest.json").read_bytes() == finished

    run_train_vae_stage(str(reference),
                        load_config(TrainVAEConfig, None, [*overrides, "ema_decay=0.9"]))  # fmt: skip
    weights = (run / "vae" / "model" / "model.safetensors").read_bytes()
    assert weights == (reference / "vae" / "model-raw" / "model.safetensors").read_bytes()
    same_results(logged, metrics(reference), after=events[-1])
    # It learns: over 16 steps the reconstruction loss falls by a fifth or more, val PSNR
    # (of the raw weights) by over half a dB.
    assert records[-1]["recon"] < 0.8 * records[0]["recon"], records
    assert records[-1]["val_psnr"] > records[0]["val_psnr"] + 0.5, records
    model = RQVAE.from_pretrained(str(run / "vae" / "model"))
    val = validation_images(Storage(), str(run / "shards"), 32, 4)
    codes = model.encode(torch.tensor(val).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert codes.shape == (4, 8, 8, 4)
    average = RQVAE.from_pretrained(str(reference / "vae" / "model")).state_dict()
    assert not torch.equal(average["decoder.conv_out.weight"],
                           model.state_dict()["decoder.conv_out.weight"])  # fmt: skip
    assert {"val_psnr", "val_psnr_raw"} <= set(metrics(reference)[-1])
