"""The whole pipeline under failure, on the S3 endpoint and two Ray nodes: a driver SIGKILLed
during encode, the endpoint going away mid-stage, a re-run after success. The input is the
demo's captioned listing, so these runs take the caption path (tokenizer, caption-conditioned
RQ-Transformer, prompts) on S3 end to end."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from model.rqvae import RQVAE
from pipeline.core.storage import Storage, StorageConfig
from pipeline.demo.data import demo_listing, write_demo_dataset
from tests.tcp_proxy import Proxy
from tests.train_helpers import metrics as stage_metrics

pytestmark = pytest.mark.slow  # end to end: whole stages on Ray (make test-fast skips them)

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = 12  # 48 images

# configs/demo.yaml cut down to seconds per stage; small shards make encode many units long.
FAST = [
    "shard.samples_per_shard=2", "shard.val_fraction=0.1",
    "train_vae.steps=4", "train_vae.batch_size=8", "train_vae.log_every=2",
    "train_vae.checkpoint_every=4", "train_vae.val_images=8", "train_vae.cpus_per_worker=0.5",
    "encode.cpus_per_actor=0.5", "encode.batch_size=1",
    "train_ar.steps=4", "train_ar.batch_size=8", "train_ar.log_every=2",
    "train_ar.checkpoint_every=4", "train_ar.preview_per_class=1",
    "train_ar.cpus_per_worker=0.5",
    "sample.num_samples=4", "sample.chunk_size=2", "sample.grid_size=2",
    "sample.cpus_per_actor=0.5",
]  # fmt: skip


@pytest.fixture
def s3_input(s3_bucket, tmp_path):
    """The demo images as class folders under s3://bucket/in/, listed with their captions in
    s3://bucket/in.csv (the input of the runs below)."""
    bucket, client = s3_bucket
    for path in write_demo_dataset(tmp_path / "in", per_class=PER_CLASS):
        key = f"in/{path.parent.name}/{path.name}"
        client.upload_file(str(path), bucket, key)
    client.upload_file(str(demo_listing(tmp_path / "in")), bucket, "in.csv")
    return bucket, client


def object_count(client, bucket: str, prefix: str, suffix: str = "") -> int:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(o["Key"].endswith(suffix) for page in pages for o in page.get("Contents", []))


def snapshot(client, bucket: str, prefix: str) -> dict[str, tuple]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages
            for o in page.get("Contents", [])}  # fmt: skip


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# A Ray cluster of two nodes (3 CPUs each, no dashboard: Ray Train's placement-group cleaner
# asks the state API on localhost:8265, which must not be another instance's), kept up by its
# own process until the test closes its stdin; the drivers below are jobs submitted to it.
TWO_NODES = r"""
import sys
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
cluster.add_node(num_cpus=3)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
"""


@contextmanager
def two_node_cluster():
    """The address of a fresh two-node Ray cluster; stopped (its process group) at exit."""
    process = subprocess.Popen([sys.executable, "-c", TWO_NODES], cwd=REPO, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        address = process.stdout.readline().strip()
        assert address, "the two-node cluster did not start"
        yield address
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def read_json(client, bucket: str, key: str) -> dict:
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def read_column(client, bucket: str, keys: list[str], column: str) -> list:
    return [value for key in keys for value in pq.read_table(io.BytesIO(client.get_object(
        Bucket=bucket, Key=key)["Body"].read())).column(column).to_pylist()]  # fmt: skip


def test_whole_pipeline_on_two_nodes_through_a_killed_driver_and_a_lost_endpoint(
        s3_input, s3_endpoint, tmp_path, classifier_weights):  # fmt: skip
    """`jobs/run.py` submitted to two nodes, on S3, as an operator lives it: the driver SIGKILLed
    during encode, the endpoint gone mid-stage, the same command again until it completes, and
    a re-run of the finished pipeline. Both training stages train DDP across the two nodes (one
    worker a node), the RQ-VAE's discriminator too; encode, sample and evaluate run two actors."""
    from tests.test_text import tiny_clip

    bucket, client = s3_input
    tiny_clip(tmp_path / "clip")  # the CLIP score of the prompts, in the evaluate stage
    proxy = Proxy(s3_endpoint)
    proxy.start()
    overrides = [*FAST, "train_vae.num_workers=2", "train_vae.cpus_per_worker=2",
                 "train_vae.loss.gan_weight=0.1", "train_vae.loss.gan_start_step=2",
                 "train_ar.num_workers=2", "train_ar.cpus_per_worker=2",
                 "encode.num_actors=2", "sample.num_actors=2", "evaluate.num_actors=2",
                 "evaluate.cpus_per_actor=0.5", f"evaluate.weights={classifier_weights}",
                 f"evaluate.clip={tmp_path / 'clip'}", f"storage.endpoint_url={proxy.url}"]  # fmt: skip
    tables = lambda: object_count(client, bucket, "run/codes/", ".parquet")  # noqa: E731
    try:
        with two_node_cluster() as address:
            command = [sys.executable, str(REPO / "jobs" / "run.py"), "--input",
                       f"s3://{bucket}/in.csv", "--run-dir", f"s3://{bucket}/run", "--config",
                       str(REPO / "configs" / "demo.yaml"), "--ray-address", address, *overrides]  # fmt: skip
            _kill_lose_resume_and_noop(command, client, bucket, proxy, tables)
    finally:
        if proxy.process.poll() is None:
            proxy.stop()
    _check_outputs(client, bucket, s3_endpoint)


def _kill_lose_resume_and_noop(command: list[str], client, bucket: str, proxy: Proxy,
                               tables) -> None:  # fmt: skip
    # 1. SIGKILL the driver once encode has written its first table.
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    wait_for(lambda: tables() >= 1, 300, "the first code table")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    shards = read_json(client, bucket, "run/shards/_manifest.json")
    after_kill = tables()
    assert 1 <= after_kill < len(shards["units"]), (after_kill, len(shards["units"]))
    assert object_count(client, bucket, "run/codes/_manifest.json") == 0

    # 2. Re-run; take the endpoint away once encode has made progress again.
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    wait_for(lambda: tables() > after_kill, 120, "encode to resume")
    proxy.stop()
    out, err = driver.communicate(timeout=180)
    assert driver.returncode == 3, (out[-2000:], err[-3000:])
    assert f"cannot reach the object store at {proxy.url}" in err, err[-3000:]
    assert "run the same command again" in err
    # The driver prints no traceback of its own (workers' logs, prefixed, may show theirs).
    assert not [x for x in err.splitlines() if x.startswith("Traceback")], err[-3000:]

    # 3. Endpoint back: the same command completes, resuming encode.
    proxy.start()
    done = subprocess.run(command, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    status = {line.split()[2]: line.split()[3] for line in done.stdout.splitlines()
              if line.startswith("rqpipe run: ")}  # fmt: skip
    assert status["shard"] == "up" and status["train-vae"] == "up", done.stdout
    assert status["encode"] == "resumed" and status["train-ar"] == "ran", done.stdout
    assert status["sample"] == "ran" and status["evaluate"] == "ran", done.stdout

    # 4. A finished pipeline re-run rewrites no object.
    before = snapshot(client, bucket, "run/")
    again = subprocess.run(command, capture_output=True, text=True, timeout=200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("up to date") >= 6
    assert snapshot(client, bucket, "run/") == before


def _check_outputs(client, bucket: str, s3_endpoint: str) -> None:
    keys = set(snapshot(client, bucket, "run/"))
    shards = read_json(client, bucket, "run/shards/_manifest.json")
    # Every image exactly once in the code tables, whatever the kill and the outage cut.
    tables = sorted(k for k in keys if k.startswith("run/codes/") and k.endswith(".parquet"))
    codes = read_column(client, bucket, tables, "key")
    assert len(codes) == len(set(codes)) == shards["counts"]["ok"] == 4 * PER_CLASS
    assert {"run/ar/model/model.safetensors", "run/ar/model/tokenizer.json",
            "run/samples/_manifest.json", "run/vae/reconstructions.png", "run/eval/metrics.json",
            "run/eval/report.md", "run/eval/reference.npz"} <= keys  # fmt: skip
    # Both training stages on S3: a metrics part a checkpoint (nothing rewritten), curves,
    # previews, checkpoints of Ray Train's own, and models that load from the bucket.
    for stage, preview in (("vae", "reconstructions/step-0000004.png"), ("ar", "samples.png")):
        assert {f"run/{stage}/_manifest.json", f"run/{stage}/metrics/part-000000004.jsonl",
                f"run/{stage}/curves.png", f"run/{stage}/model/config.json",
                f"run/{stage}/{preview}"} <= keys  # fmt: skip
        assert any(k.startswith(f"run/{stage}/") and "checkpoint_" in k
                   and k.endswith("trainer.safetensors") for k in keys)  # fmt: skip
    storage = Storage(StorageConfig(endpoint_url=s3_endpoint))
    vae_records = stage_metrics(f"s3://{bucket}/run/vae", storage)
    assert {"gan", "disc"} <= set(vae_records[-1]), vae_records[-1]  # the discriminator trained
    uri = f"s3://{bucket}/run/vae/model"
    assert RQVAE.from_pretrained(uri, storage_options=storage.options(uri)).encode(
        torch.zeros(1, 3, 32, 32)).shape == (1, 8, 8, 4)  # fmt: skip
    metrics = read_json(client, bucket, "run/eval/metrics.json")
    assert metrics["samples"]["images"] == 4 and "demo_fid" in metrics["samples"]
    assert metrics["samples"]["clip_score"]["images"] == 4
    evaluated = read_json(client, bucket, "run/eval/_manifest.json")["counts"]
    assert evaluated["reference_images"] == len(codes) - metrics["vae"]["images"]
    assert read_json(client, bucket, "run/ar/_manifest.json")["counts"]["text_vocab_size"] > 0
    # No prompts given: the run's val captions, the first distinct ones of its val tables,
    # each sample's prompt recorded beside its codes, and a grid a prompt.
    chunks = sorted(k for k in keys if k.startswith("run/samples/codes/"))
    val_tables = sorted(k for k in keys if k.startswith("run/codes/val-"))
    first_prompts = list(dict.fromkeys(read_column(client, bucket, val_tables, "caption")))[:4]
    assert len(first_prompts) == 4
    assert read_column(client, bucket, chunks, "caption") == first_prompts
    assert any(k.startswith("run/samples/grid-000-a_") for k in keys)
