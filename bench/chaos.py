"""A seeded fault soak of the whole pipeline: `jobs/run.py` on moto's S3 server and a two-node Ray
cluster, killed and cut at random moments and re-run as an operator (or a retrying job) would,
until it completes; then every object it wrote is compared with a fault-free run's. The
fault-free run is on another cluster: one that starts with no worker nodes and grows from
cluster/aws.yaml's node types under Ray's own autoscaler (bench/fake_cluster.py), whose record
(which node types each stage brought up, the idle ones gone) is the record's "autoscaled". The
stages ask for GPUs as the ImageNet recipe does; both clusters only declare them, and the
stages compute on the CPU (RQPIPE_CPU_FOR_DECLARED_GPUS).

    .venv/bin/python bench/chaos.py --faults 50 --seed 0 [--work runs/chaos]

Faults at moments drawn from the seed (gaps up to a fault-free run's time over --per-round),
each of a kind injected least so far (so every kind comes up in a short soak; a Train worker or
an actor not hit yet is waited for until one exists):
- driver: SIGKILL of the driver's process group; the same command again;
- train-worker: SIGKILL of a Ray Train worker (the stage starts a new Ray Train run from its
  last checkpoint);
- actor: SIGKILL of an encode, sample or evaluate actor (Ray restarts it and retries its task);
- node: the second node's raylet and everything on it killed (`Cluster.remove_node`, not
  graceful) and a fresh node added, as an autoscaler replaces a lost spot node;
- store: the S3 endpoint unreachable for 1-8 s (the proxy in front of moto stopped, then
  started again on its port).
After a fault the bench waits for the driver to end and runs the command again until it
succeeds. A round ends when the pipeline has completed; its objects are compared with the
fault-free run's, and the next round starts from an empty run dir, until --faults faults have
been injected (at most --per-round a round: then its runs go on undisturbed). At the end the
finished pipeline is run once more, as a retrying job would, and must rewrite nothing.

Besides the objects, findings: a code table row missing or doubled (every image the shard
stage kept, once), a run ended by store outages alone without exit code 3 and the endpoint's
message, a re-run of the finished pipeline that rewrote an object.

What is compared (`compare`): every object's bytes, but for what records when and how fast a
run went (VOLATILE_KEYS in JSON and JSON-lines objects; `curves.png`, which draws them), the
metrics logs' "resumed" records (a faulted run has them by design) and
Ray Train's bookkeeping (its checkpoint folders are named by the time they were written: they
are matched by the step in their trainer state; its snapshot file is left out). An object the
fault-free run does not have (a temporary, an orphan checkpoint, a half-written part) and one
it has that is missing are differences too. The seed fixes the moments and the choices; which
processes exist at a moment depends on timing, so the same seed repeats the schedule, not
necessarily every target.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from fake_cluster import AutoscalingCluster, print_scaling, timed_run
from scale import Services  # bench/ is first on the path: this file runs as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.core.devices import CPU_FOR_DECLARED_GPUS  # noqa: E402  (REPO on the path first)

AUTOSCALED = REPO / "cluster" / "aws.yaml"  # the fault-free run's node types

BUCKET, PER_CLASS = "soak", 12  # 48 demo images
KINDS = ("driver", "train-worker", "actor", "node", "store")
ACTOR_TITLES = ("ray::ShardEncoder", "ray::ChunkSampler", "ray::FeatureWorker")
# configs/demo.yaml cut down to seconds a stage, asking for GPUs as the ImageNet recipe does
# (declared ones, computing on the CPU: RQPIPE_CPU_FOR_DECLARED_GPUS): two Train workers with a
# GPU each, DDP; two actors with a GPU each.
OVERRIDES = [
    "shard.samples_per_shard=4", "shard.val_fraction=0.1",
    "train_vae.steps=8", "train_vae.batch_size=4", "train_vae.log_every=4",
    "train_vae.checkpoint_every=4", "train_vae.val_images=8", "train_vae.num_workers=2",
    "train_vae.cpus_per_worker=1", "train_vae.use_gpu=true", "train_vae.loss.gan_weight=0.1",
    "train_vae.loss.gan_start_step=2", "train_vae.tracking.backend=none",
    "encode.cpus_per_actor=0.5", "encode.gpus_per_actor=1", "encode.batch_size=1",
    "encode.num_actors=2",
    "train_ar.steps=8", "train_ar.batch_size=4", "train_ar.log_every=4",
    "train_ar.checkpoint_every=4", "train_ar.preview_per_class=1", "train_ar.num_workers=2",
    "train_ar.cpus_per_worker=1", "train_ar.use_gpu=true", "train_ar.tracking.backend=none",
    "sample.num_samples=8", "sample.chunk_size=2", "sample.grid_size=2",
    "sample.cpus_per_actor=0.5", "sample.gpus_per_actor=1", "sample.num_actors=2",
    "evaluate.num_actors=2", "evaluate.cpus_per_actor=0.5", "evaluate.gpus_per_actor=1",
]  # fmt: skip
# Fields that say when, how long or how fast, never what was computed.
VOLATILE_KEYS = re.compile(r"(^|_)(time|seconds|started|finished|created|updated|heartbeat|"
                           r"expires|elapsed|duration|host|pid|owner|history)($|_)|per_s|"
                           r"data_wait|mfu")  # fmt: skip
LEFT_OUT = ("checkpoint_manager_snapshot.json", "curves.png", "_lease.json")

# A two-node Ray cluster held by its own process: "replace" on its stdin kills the second node
# (not gracefully) and adds a fresh one; end of input shuts the cluster down.
CLUSTER = r"""
import sys
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 2,
                                                       "include_dashboard": False})
node = cluster.add_node(num_cpus=3, num_gpus=2)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
for line in sys.stdin:
    cluster.remove_node(node, allow_graceful=False)
    node = cluster.add_node(num_cpus=3, num_gpus=2)
    cluster.wait_for_nodes()
    print("replaced", flush=True)
cluster.shutdown()
"""


class TwoNodes:
    """The cluster process (CLUSTER); `replace()` loses the second node and adds another."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", CLUSTER], cwd=REPO, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        start_new_session=True)  # fmt: skip
        self.address = self.process.stdout.readline().strip()
        assert self.address, "the two-node cluster did not start"

    def processes(self, titles: tuple[str, ...]) -> list[psutil.Process]:
        """This cluster's processes whose title starts with one of `titles`, by pid."""
        found = []
        for process in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if " ".join(process.cmdline()).startswith(titles):
                    found.append(process)
            except psutil.Error:
                continue
        return sorted(found, key=lambda p: p.pid)

    def replace(self) -> None:
        self.process.stdin.write("replace\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "replaced"

    def stop(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# -- comparing two runs ---------------------------------------------------------------------------


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if not VOLATILE_KEYS.search(k)}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def normalised(key: str, data: bytes) -> bytes:
    """What of an object must be the same in every run: its bytes, its JSON without
    VOLATILE_KEYS."""
    if key.endswith(".json"):
        return json.dumps(_without_volatile(json.loads(data)), sort_keys=True).encode()
    if key.endswith(".jsonl"):  # a metrics log; its {"event": "resumed"} records tell of faults
        lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        lines = [r for r in lines if "event" not in r]
        return "\n".join(json.dumps(_without_volatile(r), sort_keys=True) for r in lines).encode()
    return data


def snapshot(client: Any, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, as `comparable`."""
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            objects[key] = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return comparable(objects)


def comparable(objects: dict[str, bytes]) -> dict[str, bytes]:
    """`objects` (key -> bytes) `normalised`, keyed without the timestamps Ray Train names
    checkpoint folders by (`checkpoint_<when>/` -> `checkpoint@step<N>/`), LEFT_OUT left out."""
    objects = {k: v for k, v in objects.items() if not k.endswith(LEFT_OUT)}
    steps = {}
    for key, data in objects.items():
        folder, _, name = key.rpartition("/")
        if re.search(r"/checkpoint_[^/]+$", folder) and name == "trainer.json":
            trainer = json.loads(data)
            if "__dict__" in trainer:
                trainer = dict(p for p in trainer["__dict__"] if isinstance(p[0], str))
            steps[folder] = trainer["step"]
    renamed = {}
    for key, data in objects.items():
        folder = re.match(r"(.*/checkpoint_[^/]+)/", key)
        if folder:
            step = steps.get(folder.group(1), "?")
            key = re.sub(r"/checkpoint_[^/]+/", f"/checkpoint@step{step}/", key)
            if key in renamed:  # two folders of one step: an orphan beside the committed one
                key += "#orphan"
        renamed[key] = normalised(key, data)
    return renamed


def compare(reference: dict[str, bytes], run: dict[str, bytes]) -> list[str]:
    """The differences: objects missing, extra, or other in content."""
    differences = [f"missing {k}" for k in sorted(set(reference) - set(run))]
    differences += [f"extra {k}" for k in sorted(set(run) - set(reference))]
    differences += [f"differs {k}" for k in sorted(set(reference) & set(run))
                    if reference[k] != run[k]]  # fmt: skip
    return differences


def keep(folder: Path, difference: str, reference: dict[str, bytes],
         run: dict[str, bytes]) -> None:  # fmt: skip
    """Both sides of a difference as files under `folder` ({key}.reference, {key}.run)."""
    key = difference.split(" ", 1)[1]
    for side, objects in (("reference", reference), ("run", run)):
        if key in objects:
            path = folder / f"{key}.{side}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(objects[key])


def clear(client: Any, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


# -- the soak -------------------------------------------------------------------------------------


class Soak:
    """Runs of one command, each with at most one fault at a random moment; the record."""

    def __init__(self, command: list[str], store: Services, cluster: TwoNodes, rng: random.Random,
                 logs: Path) -> None:  # fmt: skip
        self.command, self.store, self.cluster = command, store, cluster
        self.rng, self.logs = rng, logs
        self.spacing = 0.0  # the longest gap between faults, seconds (set from the reference)
        self.injected: Counter[str] = Counter()
        self.runs = 0
        self.hangs = 0
        self.events: list[dict[str, Any]] = []
        self.exits: list[dict[str, Any]] = []
        self.findings: list[str] = []  # what is wrong other than a differing object

    def run(self, faults: int) -> int:
        """One run of the command to its end, with up to `faults` faults at drawn moments
        while it runs (the gaps between them drawn up to `spacing` seconds); -> its exit code.
        Its log keeps the driver's output; `self.exits` its exit code and faults."""
        self.runs += 1
        faulted: list[str] = []
        with (self.logs / f"run-{self.runs:03d}.log").open("w") as log:
            driver = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)  # fmt: skip
            started = time.time()
            code = None
            for _ in range(faults):
                # drawn together, so the sequence of draws does not depend on timing
                gap, kind_draw, detail = (self.rng.uniform(0, self.spacing), self.rng.random(),
                                          self.rng.random())  # fmt: skip
                try:
                    code = driver.wait(timeout=gap)
                    break
                except subprocess.TimeoutExpired:
                    pass
                kind = self._kind(kind_draw, driver)
                if kind is None:  # the driver ended while waiting for a target
                    break
                self._inject(driver, kind, time.time() - started, detail)
                faulted.append(kind)
                if driver.poll() is not None:
                    break
            if code is None:
                try:
                    code = driver.wait(timeout=900)
                except subprocess.TimeoutExpired:  # a hang is a finding: recorded, then ended
                    self.hangs += 1
                    print(f"  run {self.runs}: no end after 900 s: killed (log {log.name})")
                    os.killpg(driver.pid, signal.SIGKILL)
                    code = driver.wait()
        self._check_exit(code, faulted)
        return code

    def _targets(self, kind: str) -> list[psutil.Process]:
        titles = ("ray::RayTrainWorker",) if kind == "train-worker" else ACTOR_TITLES
        return self.cluster.processes(titles)

    def _kind(self, kind_draw: float, driver: subprocess.Popen) -> str | None:
        """The kind of the next fault: one of those injected least so far (so a short soak has
        every kind), drawn. A worker or an actor lives only in some stages: one not injected
        yet is waited for as long as the run lasts, another for up to `spacing` seconds, then a
        kind that can happen now is drawn. None: the driver ended while waiting."""
        fewest = min(self.injected[k] for k in KINDS)
        kinds = [k for k in KINDS if self.injected[k] == fewest]
        kind = kinds[int(kind_draw * len(kinds))]
        if kind not in ("train-worker", "actor"):
            return kind
        deadline = time.time() + (self.spacing if self.injected[kind] else float("inf"))
        while time.time() < deadline:
            if driver.poll() is not None:
                return None
            if self._targets(kind):
                return kind
            time.sleep(0.1)
        possible = ["driver", "node", "store"] + [k for k in ("train-worker", "actor")
                                                  if self._targets(k)]  # fmt: skip
        fewest = min(self.injected[k] for k in possible)
        kinds = [k for k in KINDS if k in possible and self.injected[k] == fewest]
        return kinds[int(kind_draw * len(kinds))]

    def _inject(self, driver: subprocess.Popen, kind: str, moment: float, detail: float) -> None:
        target = ""
        if kind == "driver":
            os.killpg(driver.pid, signal.SIGKILL)
        elif kind in ("train-worker", "actor"):
            victims = self._targets(kind)
            if not victims:  # gone since it was chosen: the stage moved on
                return
            victim = victims[int(detail * len(victims))]
            target = " ".join(victim.cmdline())[:40].strip()
            victim.kill()
        elif kind == "node":
            self.cluster.replace()
        else:
            outage = 1 + 7 * detail
            target = f"{outage:.1f} s"
            self.store.stop_meter()
            time.sleep(outage)
            self.store.start_meter()
        self.injected[kind] += 1
        event = {"run": self.runs, "at_s": round(moment, 1), "fault": kind, "target": target}
        self.events.append(event)
        print(f"  run {self.runs}: {kind} at {moment:.1f} s {target}", flush=True)

    def _check_exit(self, code: int, faulted: list[str]) -> None:
        """What an operator sees must be right too: a run that fails after nothing but store
        outages ends with exit code 3 and the message naming the endpoint, no traceback of the
        driver's own (tests/test_storage.py checks the message's text)."""
        self.exits.append({"run": self.runs, "exit": code, "faults": faulted})
        if code == 0 or not faulted or set(faulted) != {"store"}:
            return
        text = (self.logs / f"run-{self.runs:03d}.log").read_text(errors="replace")
        tracebacks = [line for line in text.splitlines() if line.startswith("Traceback")]
        if code != 3 or "cannot reach the object store" not in text or tracebacks:
            self.findings.append(f"run {self.runs}: ended with exit {code} after a store outage, "
                                 f"not 3 and the endpoint's message (log "
                                 f"run-{self.runs:03d}.log)")  # fmt: skip


def row_findings(objects: dict[str, bytes]) -> list[str]:
    """No image lost or doubled: every image the shard stage kept is in the code tables once
    (`snapshot`'s objects of a finished run)."""
    import io

    import pyarrow.parquet as pq

    kept = json.loads(objects["run/shards/_manifest.json"])["counts"]["ok"]
    keys = [key for name, data in sorted(objects.items())
            if name.startswith("run/codes/") and name.endswith(".parquet")
            for key in pq.read_table(io.BytesIO(data), columns=["key"]).column("key").to_pylist()]  # fmt: skip
    doubled = len(keys) - len(set(keys))
    if doubled or len(keys) != kept:
        return [f"code tables: {len(keys)} rows, {len(set(keys))} distinct, of {kept} images kept"]
    return []


def listing(client: Any, prefix: str) -> dict[str, tuple[str, Any]]:
    """key -> (ETag, LastModified): what a re-run that rewrites nothing leaves as it was."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages
            for o in page.get("Contents", [])}  # fmt: skip


def upload_input(client: Any, work: Path) -> None:
    from pipeline.demo.data import demo_listing, write_demo_dataset

    client.create_bucket(Bucket=BUCKET)
    for path in write_demo_dataset(work / "in", per_class=PER_CLASS):
        client.upload_file(str(path), BUCKET, f"in/{path.parent.name}/{path.name}")
    client.upload_file(str(demo_listing(work / "in")), BUCKET, "in.csv")


def classifier(work: Path) -> str:
    """A randomly initialised demo classifier: evaluate's features."""
    import torch

    from model.evaluation.classifier import ImageClassifier, ImageClassifierConfig

    torch.manual_seed(0)
    folder = str(work / "classifier")
    ImageClassifier(ImageClassifierConfig(num_classes=4)).save_pretrained(folder)
    return folder


def soak(faults: int, seed: int, work: Path, per_round: int = 8) -> dict[str, Any]:
    """The reference run, then rounds of faulted runs until `faults` were injected; -> the
    record (also printed)."""
    import boto3

    # loopback credentials; Ray Train's controller polling its workers every 0.1 s, not 2 s
    # (inherited by the cluster's processes and the drivers)
    for name, value in (("AWS_ACCESS_KEY_ID", "chaos"), ("AWS_SECRET_ACCESS_KEY", "chaos-secret"),
                        ("AWS_DEFAULT_REGION", "us-east-1"),
                        ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")):  # fmt: skip
        os.environ.setdefault(name, value)
    os.environ[CPU_FOR_DECLARED_GPUS] = "1"  # both clusters' GPUs are declared ones
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    # moto's server behind bench/s3_meter.py at no added latency: stopping the meter is the
    # store outage, and the bench's own requests go to moto directly
    store, cluster = Services(0, work / "moto.log"), TwoNodes()
    scaling = watching = None
    try:
        scaling = AutoscalingCluster(AUTOSCALED, work)
        client = boto3.client("s3", endpoint_url=store.direct)
        upload_input(client, work)
        command = [sys.executable, str(REPO / "jobs" / "run.py"), "--input",
                   f"s3://{BUCKET}/in.csv", "--run-dir", f"s3://{BUCKET}/run", "--config",
                   str(REPO / "configs" / "demo.yaml")]  # fmt: skip
        overrides = [*OVERRIDES, f"evaluate.weights={classifier(work)}",
                     f"storage.endpoint_url={store.url}"]  # fmt: skip
        # The fault-free run, on the cluster that grows from the YAML's node types; the faulted
        # rounds, on the fixed two-node cluster, must end with its objects.
        started = time.time()
        code, ends = timed_run([*command, "--ray-address", scaling.address, "--cluster",
                                str(AUTOSCALED), *overrides], logs / "run-001.log")  # fmt: skip
        if code != 0:
            raise RuntimeError(f"the fault-free run failed: {logs}/run-001.log")
        horizon = time.time() - started
        runner = Soak([*command, "--ray-address", cluster.address, *overrides], store, cluster,
                      random.Random(seed), logs)  # fmt: skip
        runner.runs = 1
        # its idle nodes going, watched while the rounds run
        watching = Watching(scaling, started, ends)
        # gaps up to a fair share of a run: a round's faults land within about half of one,
        # and the runs after them (which resume) have the rest of the pipeline to go
        runner.spacing = horizon / per_round
        reference = snapshot(client, "run/")
        runner.findings += [f"fault-free run: {f}" for f in row_findings(reference)]
        print(f"chaos: fault-free run {horizon:.0f} s, {len(reference)} objects, "
              f"{sum(map(len, reference.values())) / 1e6:.1f} MB", flush=True)  # fmt: skip
        rounds, differences, compared = 0, [], 0
        while rounds == 0 or sum(runner.injected.values()) < faults:  # 0: one clean round
            rounds += 1
            clear(client, "run/")
            print(f"round {rounds}", flush=True)
            attempts, at_start = 0, sum(runner.injected.values())
            # at most `per_round` faults a round: then the runs go on to the end undisturbed
            while (
                runner.run(min(faults, at_start + per_round) - sum(runner.injected.values())) != 0
            ):
                attempts += 1
                if attempts > 50:
                    raise RuntimeError(f"round {rounds}: no successful run in 50 (logs: {logs})")
            found = snapshot(client, "run/")
            compared += sum(map(len, found.values()))
            runner.findings += [f"round {rounds}: {f}" for f in row_findings(found)]
            for difference in compare(reference, found):
                differences.append(f"round {rounds}: {difference}")
                print(f"  round {rounds}: {difference}", flush=True)
                keep(work / "differences" / f"round-{rounds}", difference, reference, found)
            print(f"  round {rounds}: done after {attempts + 1} runs; differences so far: "
                  f"{len(differences)}", flush=True)  # fmt: skip
            record = _record(seed, runner, rounds, reference, compared, differences)
            # the record so far, after every round: a soak stopped early keeps what it found
            (work / "chaos.json").write_text(json.dumps(record, indent=1))
        # The finished pipeline once more, as a retrying job would: it must rewrite nothing.
        before = listing(client, "run/")
        if runner.run(faults=0) != 0 or listing(client, "run/") != before:
            runner.findings.append(f"the re-run of the finished pipeline failed or rewrote "
                                   f"objects (log run-{runner.runs:03d}.log)")  # fmt: skip
        record = _record(seed, runner, rounds, reference, compared, differences)
        record["autoscaled"] = watching.result()
        (work / "chaos.json").write_text(json.dumps(record, indent=1))
    finally:
        if watching is not None:
            watching.thread.join()
        left = scaling.stop() if scaling is not None else 0
        cluster.stop()
        store.stop()
    record["autoscaled"]["processes_left"] = left
    (work / "chaos.json").write_text(json.dumps(record, indent=1))
    print("the fault-free run, on cluster/aws.yaml's node types under Ray's autoscaler:")
    print_scaling(record["autoscaled"])
    print(f"processes left after that cluster was stopped: {left}")
    print(f"\nchaos: seed {seed}; {sum(runner.injected.values())} faults in {rounds} rounds, "
          f"{record['runs']} runs, {runner.hangs} hangs")  # fmt: skip
    print("| fault | injected |\n|---|---:|")
    for kind in KINDS:
        print(f"| {kind} | {runner.injected[kind]} |")
    print(f"objects a run: {len(reference)}; bytes compared: {compared / 1e6:.1f} MB; "
          f"differences: {len(differences)}")  # fmt: skip
    for line in differences:
        print(f"  {line}")
    print(f"other findings: {len(runner.findings)}")
    for line in runner.findings:
        print(f"  {line}")
    print(f"reproduce: .venv/bin/python bench/chaos.py --faults {faults} --seed {seed}")
    return record


class Watching:
    """`AutoscalingCluster.record` in a thread of its own (it waits for idle nodes to go)."""

    def __init__(self, scaling: AutoscalingCluster, start: float, ends: dict[str, float]) -> None:
        self.found: dict[str, Any] = {}
        self.thread = threading.Thread(
            target=lambda: self.found.update(scaling.record(start, ends))
        )
        self.thread.start()

    def result(self) -> dict[str, Any]:
        self.thread.join()
        return self.found


def _record(seed: int, runner: Soak, rounds: int, reference: dict[str, bytes], compared: int,
            differences: list[str]) -> dict[str, Any]:  # fmt: skip
    return {"seed": seed, "faults": dict(runner.injected), "rounds": rounds,
            "runs": runner.runs - 1, "hangs": runner.hangs, "objects": len(reference),
            "keys": sorted(reference),
            "bytes_compared": compared, "differences": differences,
            "findings": runner.findings, "events": runner.events, "exits": runner.exits}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-round", type=int, default=8, help="faults before a round's "
                        "runs go on undisturbed to the end and are compared")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("runs/chaos"))
    args = parser.parse_args()
    record = soak(args.faults, args.seed, args.work.resolve(), args.per_round)
    return 1 if record["differences"] or record["hangs"] or record["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
