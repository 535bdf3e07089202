"""cluster/: the launcher YAMLs validate against the schema bundled with Ray after Ray's own
default-filling, and the KubeRay manifest has what autoscaling from zero needs."""

import copy
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
