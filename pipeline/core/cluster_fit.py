"""Whether a Ray cluster can serve what the stages ask for, checked before any stage starts.

Ray places each Train worker, actor and task on one node. A request that no node type can hold
(`encode.gpus_per_actor=2` on 1-GPU nodes, `train_vae.cpus_per_worker=32` on 16-CPU nodes) waits
forever in Ray's infeasible state, and so does a training stage whose Train workers take every
CPU: Ray Data's read tasks (1 CPU each) are never scheduled and no batch ever comes. Both are
refused here, naming the stage, the request and the node types.

The node types come from, in order: a cluster file given with `--cluster` (a Ray cluster
launcher YAML, cluster/aws.yaml, or a KubeRay RayCluster manifest, cluster/kuberay.yaml); the
node groups an autoscaling cluster reports (what its autoscaler may launch); the live nodes of a
fixed cluster (a local instance included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.core.config import ConfigError

READ_TASK_CPUS = 1.0  # what Ray Data's read tasks ask for (ray.data.read_* defaults)
# What Ray's monitor writes to the GCS KV every few seconds: the load metrics, and the
# autoscaler's report with each node's type
AUTOSCALER_STATUS_KEY = "__autoscaling_status"


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]  # CPU, GPU and custom resources of one node
    max_count: int = 1  # how many there may be; -1: no bound

    def holds(self, request: dict[str, float]) -> bool:
        return all(self.resources.get(k, 0.0) >= v for k, v in request.items() if v > 0)

    def __str__(self) -> str:
        shown = ", ".join(f"{k} {v:g}" for k, v in sorted(self.resources.items()) if v)
        return f"{self.name} ({shown or 'no CPU or GPU'})"


@dataclass(frozen=True)
class Request:
    stage: str
    what: str  # "a Train worker", "an actor", "a task"
    resources: dict[str, float]
    keys: str  # the config keys that set it, e.g. "train_vae.cpus_per_worker / use_gpu"
    count: int = 1  # how many must fit at once (an elastic range: its min) ...
    most: int = 0  # ... and how many Ray may place when the cluster has room (its max; 0: count)

    def __post_init__(self) -> None:
        object.__setattr__(self, "most", max(self.most, self.count))  # frozen


def stage_requests(stage: str, section: str, config: Any) -> list[Request]:
    """What one stage's config asks Ray for, one entry per kind of request."""
    if hasattr(config, "num_workers") and hasattr(config, "cpus_per_worker"):  # Ray Train
        resources = {"CPU": config.cpus_per_worker, "GPU": 1.0 if config.use_gpu else 0.0}
        return [Request(stage, "a Train worker", resources,
                        f"{section}.cpus_per_worker / {section}.use_gpu",
                        *config.worker_range)]  # fmt: skip
    if hasattr(config, "num_actors"):  # an actor pool: encode, sample, evaluate
        resources = {"CPU": config.cpus_per_actor, "GPU": config.gpus_per_actor}
        return [Request(stage, "an actor", resources,
                        f"{section}.cpus_per_actor / {section}.gpus_per_actor")]  # fmt: skip
    if hasattr(config, "cpus_per_task"):  # shard
        return [Request(stage, "a task", {"CPU": config.cpus_per_task},
                        f"{section}.cpus_per_task")]  # fmt: skip
    return []


def check_requests(requests: list[Request], node_types: list[NodeType], source: str) -> None:
    """Refuse a request no node type holds, and Train workers that leave no CPU for Ray Data's
    read tasks; `source` says where the node types came from."""
    node_types = [t for t in node_types if t.max_count != 0]  # a type never launched
    types = "; ".join(map(str, node_types)) or "none"
    for request in requests:
        if not any(t.holds(request.resources) for t in node_types):
            asked = ", ".join(f"{k} {v:g}" for k, v in request.resources.items() if v > 0)
            raise ConfigError(f"{request.stage}: {request.what} asks for {asked}, more than any "
                              f"node of the cluster has ({source}: {types}); Ray would wait "
                              f"for it forever. Lower {request.keys}, or add a node type that "
                              f"holds it")  # fmt: skip
        if request.what == "a Train worker":
            _check_data_cpus(request, node_types, source)


def _check_data_cpus(workers: Request, node_types: list[NodeType], source: str) -> None:
    """The Train workers must fit the cluster all at once (Ray Train places them as one group;
    an elastic range, its min), and the CPUs left beside as many as Ray may place (up to its
    max) must run one read task; with an unbounded node type the autoscaler adds what is
    missing."""
    if any(t.max_count < 0 for t in node_types):
        return
    nodes = [dict(t.resources) for t in node_types for _ in range(t.max_count)]
    placed = 0
    while placed < workers.most:  # first fit, on the nodes with the fewest CPUs left
        fitting = [n for n in nodes if all(n.get(k, 0) >= v for k, v in workers.resources.items())]
        if not fitting and placed >= workers.count:
            break  # an elastic range runs on fewer than its max
        if not fitting:
            cpus = workers.resources["CPU"]
            raise ConfigError(f"{workers.stage}: {workers.count} Train workers x {cpus:g} CPU"
                              f"{' + 1 GPU' if workers.resources.get('GPU') else ''} do not fit "
                              f"the cluster at once ({source}: {'; '.join(map(str, node_types))})"
                              f": Ray Train would wait for them forever. Lower {workers.keys} "
                              f"or num_workers, or add nodes")  # fmt: skip
        node = min(fitting, key=lambda n: n.get("CPU", 0))
        for key, value in workers.resources.items():
            node[key] = node.get(key, 0) - value
        placed += 1
    if max((n.get("CPU", 0) for n in nodes), default=0) < READ_TASK_CPUS:
        total = sum(t.resources.get("CPU", 0) * t.max_count for t in node_types)
        cpus = workers.resources["CPU"]
        raise ConfigError(f"{workers.stage}: {placed} Train workers x {cpus:g} CPU leave "
                          f"no node a whole CPU of the cluster's {total:g} ({source}), and Ray "
                          f"Data's read tasks ask for {READ_TASK_CPUS:g}: the workers would wait "
                          f"for their first batch forever. Lower {workers.keys.split(' / ')[0]} "
                          f"(e.g. {max(cpus / 2, 0.25):g}) or num_workers, or add CPUs")  # fmt: skip


# -- where the node types come from ------------------------------------------------------------


def node_types_from_file(path: str) -> list[NodeType]:
    """The node types of a Ray cluster launcher YAML (available_node_types) or a KubeRay
    RayCluster manifest (head and worker groups; GPUs from nvidia.com/gpu, CPUs from
    rayStartParams or the container's limits)."""
    import yaml

    with open(path) as f:
        document = yaml.safe_load(f)
    if "available_node_types" in document:
        head = document.get("head_node_type")
        return [NodeType(name, {k: float(v) for k, v in spec.get("resources", {}).items()},
                         1 if name == head else int(spec.get("max_workers", 0)))
                for name, spec in document["available_node_types"].items()]  # fmt: skip
    spec = document.get("spec", {})
    if "headGroupSpec" not in spec:
        raise ConfigError(f"--cluster {path}: neither a Ray cluster YAML (available_node_types) "
                          f"nor a KubeRay RayCluster (spec.headGroupSpec)")  # fmt: skip
    groups = [("head", spec["headGroupSpec"], 1)]
    groups += [(g["groupName"], g, int(g.get("maxReplicas", g.get("replicas", 1))))
               for g in spec.get("workerGroupSpecs", [])]  # fmt: skip
    return [NodeType(name, _kuberay_resources(group), count) for name, group, count in groups]


def _kuberay_resources(group: dict[str, Any]) -> dict[str, float]:
    params = group.get("rayStartParams", {})
    container = group["template"]["spec"]["containers"][0]
    limits = container.get("resources", {}).get("limits", {})
    cpus = params.get("num-cpus", limits.get("cpu", 0))
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
    return {"CPU": _quantity(cpus), "GPU": _quantity(gpus)}


def _quantity(value: Any) -> float:
    """A Kubernetes quantity of CPUs ("8", "500m") or GPUs as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def live_node_types(started_here: bool = False) -> tuple[list[NodeType] | None, str]:
    """(node types, where from) of the connected cluster: the node groups its autoscaler
    reports (KubeRay, autoscaler v2); a fixed cluster's live nodes, each a type of its own (a
    local instance this process `started_here`: its one node, before its monitor reports);
    None when an autoscaler runs that does not report its types (the cluster launcher's: give
    its YAML with --cluster) or the monitor has not reported yet."""
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    if started_here:
        return _live_nodes(), "this machine's local Ray instance"
    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, g.max_count)
                for g in config.node_group_configs], "the autoscaler's node types"  # fmt: skip
    report = json.loads(_internal_kv_get(AUTOSCALER_STATUS_KEY) or b"{}").get("autoscaler_report")
    mapping = (report or {}).get("node_type_mapping") or {}
    # A fixed cluster's monitor runs a read-only autoscaler whose node types are its nodes
    # ("node_<id>"); none yet: the monitor has not reported (its first seconds), so unknown.
    if not mapping or any(kind != f"node_{node}" for node, kind in mapping.items()):
        return None, "an autoscaler that does not report its node types"
    return _live_nodes(), "its live nodes"


def _live_nodes() -> list[NodeType]:
    import ray

    return [NodeType(f"node {n['NodeID'][:8]}", {k: float(v) for k, v in n["Resources"].items()
                                                 if not k.startswith(NOT_REQUESTED)})
            for n in ray.nodes() if n.get("Alive")]  # fmt: skip


# Resources of a live node that no stage asks for
NOT_REQUESTED = ("node:", "memory", "object_store_memory", "accelerator_type:")
