"""A cluster that grows from a cluster YAML's node types under Ray's own autoscaler, on this
machine: the autoscaler (v1, the cluster launcher's) with its fake multi-node provider, each
node it launches a raylet and its workers here. Used by bench/autoscale.py (beside a local
instance) and bench/chaos.py (the fault soak's reference run).

The node types are the YAML's, with the same names and min/max workers (the head's renamed to
the type the fake provider gives the head it runs on); their resources scaled to one machine:
at most MAX_CPUS CPUs and MAX_GPUS GPUs a node, the head keeping its 0 CPUs. The GPUs are
declared, with no CUDA behind them: the stages given one compute on the CPU
(RQPIPE_CPU_FOR_DECLARED_GPUS=1, pipeline/core/devices.py; Train workers join through gloo).
`NodeWatch` records which node types came up when, and when they went.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from scale import free_port  # bench/ is first on the path

IDLE_TIMEOUT_S = 20.0
MAX_CPUS, MAX_GPUS = 2, 2  # a node's resources, scaled to this machine
# The fake provider tags the head it runs on with this type: the YAML's head type is renamed to
# it (the autoscaler would otherwise launch a "head" for the one it cannot find)
FAKE_HEAD = "ray.head.default"
STAGES = ("shard", "train-vae", "encode", "train-ar", "sample", "evaluate")
ENV = {"RQPIPE_CPU_FOR_DECLARED_GPUS": "1",  # declared GPUs compute on the CPU
       "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the autoscaler's loop: 5 s by default
       "RAY_FAKE_CLUSTER": "1",  # what the fake multi-node provider requires
       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}  # fmt: skip


def scaled_node_types(cluster_yaml: Path) -> dict[str, dict[str, Any]]:
    """The YAML's available_node_types for the fake provider: names, min and max workers as
    written, resources scaled to this machine."""
    document = yaml.safe_load(cluster_yaml.read_text())
    head = document["head_node_type"]
    types = {}
    for name, spec in document["available_node_types"].items():
        name = FAKE_HEAD if name == head else name
        resources = spec.get("resources", {})
        scaled = {"CPU": min(resources.get("CPU", 0), MAX_CPUS)}
        if resources.get("GPU"):
            scaled["GPU"] = min(resources["GPU"], MAX_GPUS)
        types[name] = {"resources": scaled, "node_config": {},
                       "min_workers": 0 if name == FAKE_HEAD else spec.get("min_workers", 0),
                       "max_workers": 0 if name == FAKE_HEAD else spec["max_workers"]}  # fmt: skip
    return types


def fake_cluster_config(cluster_yaml: Path, gcs_port: int) -> dict[str, Any]:
    """The fake provider's cluster config for `cluster_yaml`'s node types."""
    # at most 6 worker nodes at once: each is a raylet and its workers on this machine
    return {"cluster_name": "rqpipe-fake", "max_workers": 6, "upscaling_speed": 1.0,
            "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
            "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}",
                         # nothing to set up on a local process; nodes known by their ids
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         "use_node_id_as_ip": True},
            "auth": {"ssh_user": "ubuntu"}, "docker": {}, "head_node_type": FAKE_HEAD,
            "available_node_types": scaled_node_types(cluster_yaml), "file_mounts": {},
            "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": []}  # fmt: skip


class Head:
    """`ray start --head --block` on `port` as a process group of its own, with a dashboard on a
    free local port (Ray Train's placement-group cleaner asks it whether its controller lives;
    with none it would ask localhost:8265, which may be another cluster's)."""

    def __init__(self, work: Path, name: str, port: int, *args: str) -> None:
        self.address = f"127.0.0.1:{port}"
        ray = str(Path(sys.executable).parent / "ray")
        temp = tempfile.mkdtemp(prefix=f"rq-{name}-", dir="/tmp")  # short: socket paths
        self.process = subprocess.Popen(
            [ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
             f"--temp-dir={temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", "--disable-usage-stats",
             # workers and drivers on ports the OS picks: two instances on one host would
             # otherwise both count from 10002, and a driver fail to bind one in use
             "--min-worker-port=0", "--max-worker-port=0", *args],
            env={**os.environ, **ENV}, stdout=(work / f"{name}-head.log").open("wb"),
            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def processes(self) -> list[psutil.Process]:
        """Every process this head started: its group, and its descendants (the nodes the
        autoscaler launched, should any have left the group)."""
        found = {}
        with contextlib.suppress(psutil.Error):
            found = {p.pid: p for p in psutil.Process(self.process.pid).children(recursive=True)}
        for process in psutil.process_iter():
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                if os.getpgid(process.pid) == self.process.pid:
                    found[process.pid] = process
        return list(found.values())

    def stop(self) -> int:
        """Kill the group and every descendant; -> how many were still there 10 s later."""
        processes = self.processes()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.kill()
        self.process.wait()
        _, alive = psutil.wait_procs(processes, timeout=10)
        return len(alive)


class NodeWatch:
    """The autoscaling cluster's worker nodes, polled every 0.5 s from a connected driver:
    when each came up and went, and its type (the fake provider names it in the node's
    RAY_NODE_TYPE_NAME, which Ray shows as its `ray.io/node-group` label)."""

    def __init__(self, address: str, types: dict[str, dict[str, Any]]) -> None:
        import ray

        for attempt in range(120):  # the head's first seconds
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
                break
            except ConnectionError:
                if attempt == 119:
                    raise
                time.sleep(0.5)
        self.types = types
        self.head = {n["NodeID"] for n in ray.nodes()}  # the one node of a fresh cluster
        self.nodes: dict[str, dict[str, Any]] = {}  # node id -> {type, up, down}
        self.errors: list[str] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _type(self, node: dict[str, Any]) -> str:
        label = node.get("Labels", {}).get("ray.io/node-group")
        if label:
            return label
        resources = {k: v for k, v in node["Resources"].items() if k in ("CPU", "GPU")}
        return next((n for n, t in self.types.items() if t["resources"] == resources), "?")

    def _poll(self) -> None:
        import ray

        while not self.stopped.wait(0.5):
            now = time.time()
            try:
                nodes = [n for n in ray.nodes() if n["NodeID"] not in self.head]
            except Exception as error:  # a poll missed is no reason to stop watching
                self.errors.append(repr(error))
                continue
            for node in nodes:
                seen = self.nodes.setdefault(node["NodeID"], {"type": self._type(node),
                                                              "up": now, "down": None})  # fmt: skip
                if not node["Alive"] and seen["down"] is None:
                    seen["down"] = now

    def alive(self) -> int:
        return sum(n["down"] is None for n in self.nodes.values())

    def stop(self) -> None:
        import ray

        self.stopped.set()
        self.thread.join()
        ray.shutdown()


class AutoscalingCluster:
    """The fake autoscaling cluster of `cluster_yaml` (head only at first) and its `watch`."""

    def __init__(self, cluster_yaml: Path, work: Path) -> None:
        port = free_port()
        config = fake_cluster_config(cluster_yaml, port)
        self.types = config["available_node_types"]
        (work / "fake-cluster.json").write_text(json.dumps(config, indent=1))
        self.head = Head(work, "autoscaling", port, "--num-cpus=0",
                         f"--autoscaling-config={work / 'fake-cluster.json'}")  # fmt: skip
        self.address = self.head.address
        self.watch = NodeWatch(self.address, self.types)
        time.sleep(1.0)
        self.workers_at_start = self.watch.alive()

    def record(self, start: float, ends: dict[str, float]) -> dict[str, Any]:
        """After a run from `start` whose stages ended at `ends`: which node types each stage
        brought up, and the idle nodes gone (waited for up to idle_timeout + 90 s)."""
        finished = max(ends.values(), default=time.time())
        while self.watch.alive() and time.time() - finished < IDLE_TIMEOUT_S + 90:
            time.sleep(0.5)
        gone = [n["down"] for n in self.watch.nodes.values() if n["down"] is not None]
        return {"idle_timeout_s": IDLE_TIMEOUT_S, "workers_at_start": self.workers_at_start,
                "stages": stage_launches(start, ends, self.watch.nodes),
                "nodes": sorted(({"type": n["type"], "up": round(n["up"] - start, 1),
                                  "down": None if n["down"] is None
                                  else round(n["down"] - start, 1)}
                                 for n in self.watch.nodes.values()), key=lambda n: n["up"]),
                "last_worker_gone_s": round(max(gone, default=finished) - finished, 1),
                "workers_at_end": self.watch.alive(),
                # the processes too: the head's raylet alone, every launched node's gone
                "raylets_at_end": sum(p.name() == "raylet" for p in self.head.processes()),
                "watch_errors": self.watch.errors}  # fmt: skip

    def stop(self) -> int:
        """-> how many of its processes outlived it by 10 s."""
        self.watch.stop()
        return self.head.stop()


def timed_run(command: list[str], log_path: Path) -> tuple[int, dict[str, float]]:
    """`command` (a jobs/run.py) with ENV, its output to `log_path`, each line timed; -> (exit
    code, each stage's end time: its `rqpipe run:` line)."""
    ends = {}
    with log_path.open("w") as log:
        driver = subprocess.Popen(command, env={**os.environ, **ENV}, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        for line in driver.stdout:
            log.write(f"{time.time():.1f} {line}")
            log.flush()
            found = re.match(r"rqpipe run: (\S+)", line)
            if found:
                ends[found.group(1)] = time.time()
        return driver.wait(), ends


def stage_launches(start: float, ends: dict[str, float],
                   nodes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """For each stage: the node types launched while it ran (from the previous stage's end to
    its own) and the seconds from its start to its first launch."""
    stages, begin = {}, start
    for stage in STAGES:
        end = ends.get(stage, float("inf"))
        launched = sorted((n["up"], n["type"]) for n in nodes.values() if begin <= n["up"] < end)
        stages[stage] = {"seconds": round(end - begin, 1) if end < float("inf") else None,
                         "launched": [t for _, t in launched],
                         "first_launch_s": round(launched[0][0] - begin, 1) if launched else None}  # fmt: skip
        begin = end
    return stages


def print_scaling(scaling: dict[str, Any]) -> None:
    """What `AutoscalingCluster.record` found, as a table and a line."""
    print("| stage | seconds | node types launched | first launch after (s) |")
    print("|---|---:|---|---:|")
    for stage, seen in scaling["stages"].items():
        launched = ", ".join(f"{t} x{seen['launched'].count(t)}"
                             for t in dict.fromkeys(seen["launched"])) or "none"  # fmt: skip
        first = "" if seen["first_launch_s"] is None else f"{seen['first_launch_s']:.1f}"
        print(f"| {stage} | {seen['seconds']} | {launched} | {first} |")
    print(f"worker nodes: {scaling['workers_at_start']} at the start, {len(scaling['nodes'])} "
          f"launched, the last gone {scaling['last_worker_gone_s']} s after the run ended "
          f"(idle_timeout {scaling['idle_timeout_s']:.0f} s), {scaling['workers_at_end']} left; "
          f"raylets then: {scaling['raylets_at_end']} (the head's)")  # fmt: skip
