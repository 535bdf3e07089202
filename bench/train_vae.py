"""train-vae throughput: Ray Train (1 worker, data streamed by Ray Data) against a plain torch
loop over the same model, batch and images held in memory, in one run.

    python bench/train_vae.py             # tiny RQ-VAE, 32x32, batch 32

Ray gives the worker 2 CPUs (of 4 logical, so decode tasks still get some): Ray sets the
worker's torch threads from its CPUs, and the plain loop uses both cores too.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.training import build_train_state, vae_train_step
from pipeline.core.storage import Storage
from pipeline.demo.data import write_demo_dataset
from pipeline.stages.shard import ShardConfig, run_shard_stage
from pipeline.stages.train_vae import TrainVAEConfig, run_train_vae_stage, validation_images
from pipeline.stages.train_vae.data import _split_tars
from pipeline.stages.train_vae.worker import pixels_to_model

STEPS, BATCH, LOG_EVERY = 100, 32, 20


def main() -> None:
    import ray

    work = Path(tempfile.mkdtemp(prefix="rqpipe-bench-vae-"))
    try:
        write_demo_dataset(work / "in", per_class=512)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        run_shard_stage(str(work / "in"), str(work / "run"),
                        ShardConfig(image_size=32, samples_per_shard=256, val_fraction=0.05))  # fmt: skip
        config = TrainVAEConfig(steps=STEPS, batch_size=BATCH, num_workers=1, cpus_per_worker=2,
                                log_every=LOG_EVERY, checkpoint_every=STEPS, val_images=16)  # fmt: skip
        config.loss.gan_weight = 0.0

        # Plain loop: the same images, decoded once, in memory.
        shards = str(work / "run" / "shards")
        count = len(_split_tars(Storage(), shards, "train")) * 256
        images = pixels_to_model(torch.from_numpy(validation_images(Storage(), shards, 32, count)))
        state = build_train_state(config)
        generator = torch.Generator().manual_seed(0)
        times = []
        for step in range(STEPS):
            batch = images[torch.randint(len(images), (BATCH,), generator=generator)]
            start = time.perf_counter()
            vae_train_step(state, [batch], step, config)
            times.append(time.perf_counter() - start)
        plain = BATCH / np.mean(times[LOG_EVERY:])  # the same windows as Ray's logs

        start = time.perf_counter()
        run_train_vae_stage(str(work / "run"), config)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in
                   (work / "run" / "vae" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
        steady = records[1:]  # the first window holds worker start and compilation
        ray_rate = float(np.mean([r["images_per_s_per_worker"] for r in steady]))
        wait = float(np.mean([r["data_wait_fraction"] for r in steady]))
        print(f"tiny RQ-VAE, 32x32, batch {BATCH}, {STEPS} steps, torch threads "
              f"{torch.get_num_threads()}")  # fmt: skip
        print(f"{'method':<34} {'images/s':>9} {'ratio':>6}")
        print(f"{'plain torch loop (in memory)':<34} {plain:>9.1f} {1.0:>6.2f}")
        print(f"{'ray train, 1 worker (steady)':<34} {ray_rate:>9.1f} {ray_rate / plain:>6.2f}")
        print(f"data wait: {wait:.1%} of the worker's time; whole stage wall time {wall:.1f} s "
              f"for {STEPS * BATCH} images")  # fmt: skip
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
