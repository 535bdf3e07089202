"""Real clusters: `ray job submit` against a head node started here, and a multi-node
`ray.cluster_utils.Cluster` that loses a node mid-run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.core.storage import StorageConfig
from pipeline.demo.data import write_demo_dataset
from pipeline.formats.codes_table import codes_array
from tests.conftest import free_port
from tests.test_encode import expected_codes, prepared_run

pytestmark = pytest.mark.slow  # end to end: whole stages on Ray (make test-fast skips them)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` in its own process group; stopped by that group's id."""
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rqp-", dir="/tmp")  # short: Ray's socket paths
    log = open(tmp_path_factory.mktemp("head") / "head.log", "wb")  # noqa: SIM115
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--include-dashboard=true",
         # every port free: this session's own Ray instance holds the defaults
         f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=1).read()
            break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("the Ray head node did not start")
    # The dashboard answers before the node's job agent registers: wait until a job runs.
    while time.time() < deadline:
        probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--",
                                "python", "-c", "pass"], capture_output=True, text=True,
                               timeout=120, env=env)  # fmt: skip
        if probe.returncode == 0:
            break
        time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail(f"the Ray head accepts no jobs: {probe.stderr[-500:]}")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:  # `ray start --block` can take 30 s over its own shutdown: the rest is throwaway
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)  # the head's session logs: nothing to keep


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "in"
    write_demo_dataset(root, per_class=12)
    return root


def check_tables(run: Path, model) -> None:
    table = pq.read_table(run / "codes")
    expected = expected_codes(model, str(run), StorageConfig())
    got = dict(zip(table.column("key").to_pylist(), codes_array(table), strict=True))
    assert len(table) == len(expected) == len(got), "exactly one row per image"
    assert all((got[k] == expected[k]).all() for k in expected)
    leftovers = [p.name for p in (run / "codes").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporaries of killed writers left behind: {leftovers}"


def test_ray_job_submit_encode(ray_local, ray_head, demo_images, tmp_path):
    address, env = ray_head
    run = tmp_path / "run"
    model = prepared_run(demo_images, str(run), StorageConfig())
    runtime_env = {"working_dir": str(REPO), "excludes": [".venv", ".git", "runs", "*.egg-info"]}
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address,
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "jobs/encode.py", "--run-dir", str(run), "cpus_per_actor=0.5"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    assert "succeeded" in job.stdout
    check_tables(run, model)


MULTINODE = """
import glob, sys, threading, time
import ray
from ray.cluster_utils import Cluster
from pipeline.stages.encode import EncodeConfig, run_encode_stage

run = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
ray.init(address=cluster.address, log_to_driver=False)
outcome = {}
def encode():
    try:
        outcome["manifest"] = run_encode_stage(
            run, EncodeConfig(num_actors=2, cpus_per_actor=0.5, batch_size=1))
    except BaseException as error:
        outcome["error"] = repr(error)
thread = threading.Thread(target=encode)
thread.start()
while len(glob.glob(run + "/codes/*.parquet")) < 2 and thread.is_alive():
    time.sleep(0.01)
removed_mid_run = thread.is_alive() and not glob.glob(run + "/codes/_manifest.json")
cluster.remove_node(nodes[1])
thread.join()
print("RESULT", removed_mid_run, outcome.get("error"), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def test_node_lost_mid_encode_gives_the_exact_result(ray_local, demo_images, tmp_path):
    run = tmp_path / "run"
    model = prepared_run(demo_images, str(run), StorageConfig(), per_shard=2)
    result = subprocess.run([sys.executable, "-c", MULTINODE, str(run)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert result.returncode == 0 and lines, (result.stdout + result.stderr)[-3000:]
    assert lines[0] == "RESULT True None", lines[0]
    check_tables(run, model)
