"""cluster/: the launcher YAMLs validate against the schema bundled with Ray after Ray's own
default-filling, and the KubeRay manifest has what autoscaling from zero needs."""

import copy
import os
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
RAY_TAG = re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)-py311")


def launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_yaml_validates_against_rays_schema(name):
    raw = launcher(name)
    config = prepare_config(copy.deepcopy(raw))  # merges the provider's defaults.yaml
    validate_config(config)

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "GPU" not in head["resources"]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert all(w["min_workers"] == 0 and w["max_workers"] >= 1 for w in workers.values())
    gpus = sorted(w["resources"].get("GPU", 0) for w in workers.values())
    assert gpus == [0, 1, 8], gpus  # a CPU-only type, a 1-GPU type and an 8-GPU type
    assert config["idle_timeout_minutes"] > 0
    for image in (raw["docker"]["image"], raw["docker"]["head_image"]):
        assert RAY_TAG.match(image).group(1) == ray.__version__, image
    assert any("pip install" in c and "rqpipe" in c for c in raw["setup_commands"])
    assert raw["file_mounts"] == {"~/rqpipe": "."}


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml", "kuberay.yaml"])
def test_dashboard_and_its_job_api_listen_on_localhost_only(name):
    text = (CLUSTER / name).read_text()
    assert "0.0.0.0" not in text
    hosts = re.findall(r"dashboard-host[=:]\s*(\S+)", text)
    assert hosts == ["127.0.0.1"], hosts


def test_schema_validation_catches_a_misspelt_key():
    broken = launcher("aws.yaml")
    broken["available_node_types"]["cpu-16"]["min_worker"] = 0  # a typo
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


def test_kuberay_manifest():
    manifest = yaml.safe_load((CLUSTER / "kuberay.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    spec = manifest["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpus = []
    for group in groups.values():
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        gpus.append(int(limits.get("nvidia.com/gpu", 0)))
        assert container["resources"]["requests"] == limits  # guaranteed QoS, no overcommit
    assert sorted(gpus) == [0, 1, 8]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert RAY_TAG.match(base).group(1) == ray.__version__
    assert "pip install" in dockerfile and "rqpipe" in dockerfile


# -- what the stages ask for against what the clusters have (pipeline/core/cluster_fit.py) ------


def recipe_plan(config: str, *overrides: str) -> list:
    """A paper recipe's planned stages, without the files its preflight wants (LPIPS weights)."""
    from pipeline.core.config import load_config
    from pipeline.run import STAGES, PlannedStage, stage_overrides

    plan = []
    for s in STAGES:
        config_class, run = s.load()
        stage_config = load_config(config_class, config, stage_overrides(config_class.section,
                                                                          list(overrides)))  # fmt: skip
        plan.append(PlannedStage(s, stage_config, run))
    return plan


RECIPES = ["imagenet256-8x8x4.yaml", "ffhq256-8x8x4.yaml", "cc3m-8x8x4.yaml"]


@pytest.mark.parametrize("cluster", ["aws.yaml", "gcp.yaml", "kuberay.yaml"])
def test_every_recipe_fits_every_cluster_file(cluster):
    from pipeline.core.cluster_fit import node_types_from_file
    from pipeline.run import check_cluster

    types = {t.name: t for t in node_types_from_file(str(CLUSTER / cluster))}
    assert types["head"].resources.get("CPU", 0) == 0 and types["head"].max_count == 1
    assert sorted(t.resources.get("GPU", 0) for n, t in types.items() if n != "head") == [0, 1, 8]
    for recipe in RECIPES:
        check_cluster(recipe_plan(str(CLUSTER.parent / "configs" / recipe)), str(CLUSTER / cluster))


@pytest.mark.parametrize(("override", "expected"), [
    ("encode.gpus_per_actor=9", r"encode: an actor asks for CPU 1, GPU 9, more than any node "
                                r"of the cluster has \(.*aws.yaml: head \(no CPU or GPU\); "
                                r"cpu-16 \(CPU 16\); gpu-8xa100 \(CPU 96, GPU 8\); gpu-1xa10g "
                                r"\(CPU 8, GPU 1\)\).* Lower encode.cpus_per_actor / "
                                r"encode.gpus_per_actor"),
    ("train_vae.cpus_per_worker=128", r"train-vae: a Train worker asks for CPU 128, GPU 1, more "
                                      r"than any node"),
    ("shard.cpus_per_task=100", r"shard: a task asks for CPU 100"),
])  # fmt: skip
def test_a_request_no_node_type_holds_is_refused_naming_it(override, expected):
    from pipeline.core.config import ConfigError
    from pipeline.run import check_cluster

    plan = recipe_plan(str(CLUSTER.parent / "configs" / "imagenet256-8x8x4.yaml"), override)
    with pytest.raises(ConfigError, match=expected):
        check_cluster(plan, str(CLUSTER / "aws.yaml"))


def test_train_workers_that_leave_ray_data_no_cpu_are_refused():
    """Two 1-CPU Train workers on a 2-CPU machine: Ray Data's read task (1 CPU) could never run,
    and the workers would wait for their first batch forever (found as a 6-minute silent hang)."""
    from pipeline.core.cluster_fit import NodeType, Request, check_requests
    from pipeline.core.config import ConfigError

    machine = [NodeType("laptop", {"CPU": 2.0})]
    workers = Request("train-ar", "a Train worker", {"CPU": 1.0, "GPU": 0.0},
                      "train_ar.cpus_per_worker / train_ar.use_gpu", count=2)  # fmt: skip
    with pytest.raises(ConfigError, match=r"train-ar: 2 Train workers x 1 CPU leave no node a "
                                          r"whole CPU of the cluster's 2 .*Lower "
                                          r"train_ar.cpus_per_worker \(e.g. 0.5\)"):  # fmt: skip
        check_requests([workers], machine, "its live nodes")
    check_requests([Request(**{**workers.__dict__, "resources": {"CPU": 0.5}})], machine, "")
    # two nodes: the workers take one each and leave each a CPU
    check_requests([workers], [NodeType("node", {"CPU": 2.0}, max_count=2)], "")
    # an unbounded node type: the autoscaler adds what the read tasks need
    check_requests([workers], [NodeType("node", {"CPU": 2.0}, max_count=-1)], "")
    # an elastic range: its min must fit at once, and as many as Ray may place up to its max
    # must leave a CPU (a 3-CPU machine holds one 2-CPU worker beside the reads)
    wide = Request("train-ar", "a Train worker", {"CPU": 2.0}, "train_ar.cpus_per_worker",
                   count=1, most=2)  # fmt: skip
    check_requests([wide], [NodeType("head", {"CPU": 3.0})], "")
    with pytest.raises(ConfigError, match="train-ar: 2 Train workers x 2 CPU leave no node"):
        check_requests([wide], [NodeType("head", {"CPU": 4.0})], "")
    with pytest.raises(ConfigError, match="train-ar: 2 Train workers x 2 CPU do not fit"):
        check_requests([Request(**{**wide.__dict__, "count": 2})], [NodeType("h", {"CPU": 3.0})],
                       "")  # fmt: skip


def test_the_cli_refuses_what_the_cluster_cannot_serve_before_any_stage_runs(ray_local,
                                                                             tmp_path):  # fmt: skip
    """Against the live cluster (this session's 4-CPU instance): two 2-CPU Train workers would
    leave Ray Data no CPU; against a cluster file, given with --cluster: an actor no node type
    holds, refused before Ray is even joined. Nothing is written either time."""
    import subprocess
    import sys
    import time

    from pipeline.core.cluster_fit import live_node_types
    from pipeline.demo.data import demo_listing, write_demo_dataset

    repo = CLUSTER.parent
    address = ray_local.get_runtime_context().gcs_address
    deadline = time.time() + 60  # a fresh instance's monitor reports its nodes within seconds
    while live_node_types()[0] is None and time.time() < deadline:
        time.sleep(0.5)
    refused = subprocess.run([sys.executable, str(repo / "jobs" / "train_ar.py"), "--run-dir",
                              str(tmp_path / "run"), "--ray-address", address, "strategy=fsdp",
                              "num_workers=2", "cpus_per_worker=2"], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert ("train-ar: 2 Train workers x 2 CPU leave no node a whole CPU of the cluster's 4 "
            "(its live nodes)") in refused.stderr  # fmt: skip
    # the same on the local instance a command starts for itself, before its monitor reports
    # (it once hung there: the check waited for a report that comes seconds later)
    from ray._private.utils import get_num_cpus  # what a local instance takes (cgroup-aware)

    cpus = get_num_cpus()
    half = cpus / 2
    refused = subprocess.run([sys.executable, str(repo / "jobs" / "train_ar.py"), "--run-dir",
                              str(tmp_path / "run"), "num_workers=2", f"cpus_per_worker={half:g}"],
                             capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert (
        f"train-ar: 2 Train workers x {half:g} CPU leave no node a whole CPU of the "
        f"cluster's {os.cpu_count()} (this machine's local Ray instance)"
    ) in refused.stderr

    write_demo_dataset(tmp_path / "in", per_class=1)
    command = [sys.executable, "-m", "pipeline.cli", "run", "--input",
               str(demo_listing(tmp_path / "in")), "--run-dir", str(tmp_path / "run"),
               "--config", "configs/demo.yaml", "--cluster", "cluster/aws.yaml",
               "evaluate.enabled=false", "encode.gpus_per_actor=9"]  # fmt: skip
    refused = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "encode: an actor asks for CPU 1, GPU 9" in refused.stderr
    assert "cluster/aws.yaml: head" in refused.stderr and "Ray" not in refused.stdout
    assert not (tmp_path / "run").exists()
