"""The cluster YAMLs under Ray's own autoscaler: `jobs/run.py` on a cluster that starts with no
worker nodes and grows from a cluster YAML's node types (bench/fake_cluster.py), beside the
same run on a fixed local instance that declares the same kind of GPUs; which node types came
up for which stage, how long that took, that the outputs are the same, and that idle nodes go.

    .venv/bin/python bench/autoscale.py [--cluster cluster/aws.yaml] [--work runs/autoscale]

Each stage asks for what the ImageNet recipe asks, scaled down: shard's CPU tasks, two Train
workers with a GPU each, two actors with a GPU each. Measured: for each stage, the node types
launched while it ran and the seconds from its start to the first launch; the pipeline's time
on both clusters; the seconds from the end of the run to the last worker node gone
(idle_timeout); processes left afterwards. The record goes to WORK/autoscale.json. The fault
soak (bench/chaos.py, run by the tests) runs its reference on the same autoscaling cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from chaos import classifier, comparable, compare  # bench/ is first on the path
from fake_cluster import AutoscalingCluster, Head, print_scaling, timed_run
from scale import free_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# configs/demo.yaml cut to seconds a stage; every stage asks what the ImageNet recipe asks for
OVERRIDES = [
    "shard.samples_per_shard=8", "shard.val_fraction=0.1", "shard.cpus_per_task=1",
    "train_vae.steps=4", "train_vae.batch_size=4", "train_vae.log_every=2",
    "train_vae.checkpoint_every=4", "train_vae.val_images=8", "train_vae.num_workers=2",
    "train_vae.cpus_per_worker=1", "train_vae.use_gpu=true", "train_vae.threads_per_worker=1",
    "train_vae.tracking.backend=none", "train_ar.tracking.backend=none",
    "encode.num_actors=2", "encode.cpus_per_actor=1", "encode.gpus_per_actor=1",
    "train_ar.steps=4", "train_ar.batch_size=4", "train_ar.log_every=2",
    "train_ar.checkpoint_every=4", "train_ar.preview_per_class=1", "train_ar.num_workers=2",
    "train_ar.cpus_per_worker=1", "train_ar.use_gpu=true", "train_ar.threads_per_worker=1",
    "sample.num_samples=8", "sample.chunk_size=4", "sample.grid_size=2", "sample.num_actors=2",
    "sample.cpus_per_actor=1", "sample.gpus_per_actor=1",
    "evaluate.num_actors=2", "evaluate.cpus_per_actor=1", "evaluate.gpus_per_actor=1",
]  # fmt: skip


def run_pipeline(address: str, work: Path, name: str, *extra: str) -> tuple[int, dict[str, float]]:
    """jobs/run.py on the cluster at `address` into WORK/NAME; -> as `timed_run`."""
    command = [sys.executable, str(REPO / "jobs" / "run.py"), "--input", str(work / "in"),
               "--run-dir", str(work / name), "--config", str(REPO / "configs" / "demo.yaml"),
               "--ray-address", address, *extra, *OVERRIDES,
               f"evaluate.weights={work / 'classifier'}"]  # fmt: skip
    return timed_run(command, work / f"{name}.log")


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root` by its relative path, the run dir's own path in them as RUN
    (each run writes its absolute path into its reports)."""
    return {str(p.relative_to(root)): p.read_bytes().replace(str(root).encode(), b"RUN")
            for p in root.rglob("*") if p.is_file()}  # fmt: skip


def autoscale(cluster_yaml: Path, work: Path) -> dict[str, Any]:
    from pipeline.demo.data import write_demo_dataset

    work.mkdir(parents=True, exist_ok=True)
    write_demo_dataset(work / "in", per_class=8)  # 32 images
    classifier(work)
    scaling = AutoscalingCluster(cluster_yaml, work)
    local = Head(work, "local", free_port(), "--num-cpus=4", "--num-gpus=2")
    record: dict[str, Any] = {}
    try:
        runs: dict[str, Any] = {}
        threads = [threading.Thread(target=lambda n=n, h=h, e=e: runs.__setitem__(
                       n, (time.time(), *run_pipeline(h.address, work, n, *e))))
                   for n, h, e in (("autoscaled", scaling, ("--cluster", str(cluster_yaml))),
                                   ("local", local, ()))]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        record["scaling"] = scaling.record(runs["autoscaled"][0], runs["autoscaled"][2])
        for name, (start, code, ends) in runs.items():
            record[name] = {"exit": code, "seconds": round(max(ends.values(), default=start)
                                                           - start, 1), "ends": ends}  # fmt: skip
        record["differences"] = compare(comparable(files(work / "local")),
                                        comparable(files(work / "autoscaled")))  # fmt: skip
        record["objects"] = len(files(work / "local"))
    finally:
        record["processes_left"] = scaling.stop() + local.stop()
    (work / "autoscale.json").write_text(json.dumps(record, indent=1))
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", type=Path, default=REPO / "cluster" / "aws.yaml")
    parser.add_argument("--work", type=Path, default=Path("runs/autoscale"))
    args = parser.parse_args()
    record = autoscale(args.cluster.resolve(), args.work.resolve())
    print_scaling(record["scaling"])
    print(f"pipeline: {record['autoscaled']['seconds']} s autoscaled (exit "
          f"{record['autoscaled']['exit']}), {record['local']['seconds']} s on the local "
          f"instance (exit {record['local']['exit']}), run side by side; outputs: "
          f"{record['objects']} objects, {len(record['differences'])} differences; processes "
          f"left after both clusters were stopped: {record['processes_left']}")  # fmt: skip
    for difference in record["differences"][:20]:
        print(f"  {difference}")
    ok = (record["autoscaled"]["exit"] == 0 and record["local"]["exit"] == 0
          and not record["differences"] and not record["processes_left"])  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
