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
    rewrites nothing."""
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
