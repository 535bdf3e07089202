"""The whole pipeline under faults, as the fault soak runs it (bench/chaos.py): `jobs/run.py` on
the S3 endpoint and two Ray nodes, with the demo's captioned listing (the caption path:
tokenizer, caption-conditioned RQ-Transformer, prompts), first undisturbed, then through eight
seeded faults of every kind (a SIGKILLed driver, Train worker and actor, a lost node, the
endpoint gone), re-run after each until it completes; then once more, finished."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: whole stages on Ray (make test-fast skips them)

REPO = Path(__file__).resolve().parents[1]
SEED = 1  # bench/chaos.py --seed: a failure here reproduces with that one command
KINDS = {"driver", "train-worker", "actor", "node", "store"}


def test_whole_pipeline_through_eight_seeded_faults_ends_as_the_fault_free_run(tmp_path):
    """Every object the faulted run wrote is the fault-free run's (tars, code tables, weights,
    samples, metrics; nothing missing, nothing extra), every image once in the code tables, a
    run that a store outage ends says so with exit code 3, and the finished pipeline re-run
    rewrites nothing. The fault-free run is on a cluster that grows from cluster/aws.yaml's
    node types under Ray's autoscaler (bench/chaos.py), the faulted ones on a fixed cluster."""
    work = tmp_path / "soak"
    soak = subprocess.run([sys.executable, str(REPO / "bench" / "chaos.py"), "--faults", "8",
                           "--seed", str(SEED), "--work", str(work)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    record = json.loads((work / "chaos.json").read_text())
    assert soak.returncode == 0, soak.stdout[-4000:] + soak.stderr[-3000:]
    assert record["differences"] == [] and record["findings"] == [] and record["hangs"] == 0
    assert sum(record["faults"].values()) >= 8 and set(record["faults"]) == KINDS, record["faults"]
    # the faults cost re-runs, and the comparison covered a whole run's artifacts
    assert record["runs"] > 2 and record["bytes_compared"] > 10e6
    artifacts = set(record["keys"])
    assert {"run/shards/_manifest.json", "run/vae/model/model.safetensors",
            "run/vae/reconstructions.png", "run/codes/_manifest.json",
            "run/ar/model/model.safetensors", "run/ar/model/tokenizer.json", "run/ar/samples.png",
            "run/samples/_manifest.json", "run/eval/metrics.json", "run/eval/report.md",
            "run/eval/reference.npz"} <= artifacts  # fmt: skip
    assert any(k.startswith("run/samples/grid-000-a_") for k in artifacts)  # a grid a prompt
    assert sum(k.startswith("run/codes/") and k.endswith(".parquet") for k in artifacts) > 5

    # The fault-free run was on cluster/aws.yaml's node types under Ray's autoscaler, from zero
    # worker nodes: shard's CPU tasks brought up CPU nodes, never GPU ones; train-vae's GPU
    # workers a GPU node; the faulted runs on a fixed cluster ended with its objects (above).
    scaling = record["autoscaled"]
    stages = scaling["stages"]
    assert scaling["workers_at_start"] == 0 and stages["shard"]["launched"], scaling
    assert set(stages["shard"]["launched"]) == {"cpu-16"}, stages
    assert set(stages["train-vae"]["launched"]) & {"gpu-8xa100", "gpu-1xa10g"}, stages
    assert {t for s in stages.values() for t in s["launched"]} <= {"cpu-16", "gpu-8xa100",
                                                                    "gpu-1xa10g"}  # fmt: skip
    # idle nodes went after idle_timeout, their processes with them; nothing was left running
    assert scaling["workers_at_end"] == 0 and scaling["raylets_at_end"] == 1, scaling
    assert scaling["last_worker_gone_s"] <= scaling["idle_timeout_s"] + 60, scaling
    assert scaling["processes_left"] == 0
