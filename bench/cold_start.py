"""Cold starts: what a fresh Ray job pays before its first work, on a small input.

    python bench/cold_start.py

Each measurement runs in a new process with a new local Ray instance of 6 CPUs (the fault
soak's two nodes of 3 on this 2-core machine), so every worker process it needs is started
for it, as for each `rqpipe run` submitted to a cluster:
- the shard stage's census of a 48-row CSV listing (its first Ray Data execution), and the
  same census again in the same job (workers warm);
- the modules the stages' Ray Data maps live in: whether a worker importing them pays for
  torch, and how long that import takes;
- a 2-step, 1-worker train-vae fit, from the driver's call to its return.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAP_MODULES = ("pipeline.stages.shard", "pipeline.formats.shard_tar",
               "pipeline.formats.codes_table")  # fmt: skip

CENSUS = r"""
import json, sys, tempfile, time
import ray
from pipeline.core.storage import Storage
from pipeline.demo.data import demo_listing, write_demo_dataset
from pipeline.stages.shard.listing import input_rows, take_census
work = tempfile.mkdtemp(prefix="rqpipe-cold-")
write_demo_dataset(work + "/in", per_class=12)
listing = str(demo_listing(work + "/in"))
ray.init(num_cpus=6, include_dashboard=False, logging_level="ERROR")
times = []
for _ in range(2):
    started = time.time()
    rows, kind = input_rows(Storage(), listing, 0.1, 1)
    take_census(rows, kind, 0.1, 1)
    times.append(time.time() - started)
print(json.dumps(times))
"""

FIT = r"""
import json, os, tempfile, time
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
import ray
from pipeline.demo.data import write_demo_dataset
from pipeline.stages.shard import ShardConfig, run_shard_stage
from pipeline.stages.train_vae import TrainVAEConfig, run_train_vae_stage
work = tempfile.mkdtemp(prefix="rqpipe-cold-")
write_demo_dataset(work + "/in", per_class=8)
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
run_shard_stage(work + "/in", work + "/run", ShardConfig(image_size=32, samples_per_shard=8,
                                                         cpus_per_task=0.5))
config = TrainVAEConfig(steps=2, batch_size=4, num_workers=1, cpus_per_worker=0.5, log_every=2,
                        checkpoint_every=2, val_images=4)
config.loss.gan_weight, config.tracking.backend = 0.0, "none"
started = time.time()
run_train_vae_stage(work + "/run", config)
print(json.dumps(time.time() - started))
"""


def _last_json(code: str) -> object:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    print("| module a Ray Data map lives in | imports torch | import time |\n|---|---|---:|")
    for module in MAP_MODULES:
        code = (f"import sys, time; t = time.time(); import {module}; "
                f"print(time.time() - t, 'torch' in sys.modules)")  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, check=True)  # fmt: skip
        seconds, torch = done.stdout.split()
        print(f"| {module} | {torch} | {float(seconds):.2f} s |")
    cold, warm = _last_json(CENSUS)
    print(f"\ncensus of a 48-row listing on 6 CPUs: {cold:.1f} s cold, {warm:.1f} s warm")
    print(f"train-vae, 2 steps on 1 worker, from the call: {_last_json(FIT):.1f} s")


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"({time.time() - started:.0f} s)")
