"""Shared real services for the tests: one local Ray instance, one S3 endpoint (moto's server
as its own process on a free loopback port). Nothing is mocked."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

# Credentials for the loopback S3 endpoint only; set before Ray starts so workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "rqpipe-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "rqpipe-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# Ray Train V2 polls workers every 2 s by default: tests would mostly wait.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# Ray Train starts a preemption-watcher actor (a process importing Ray Train, ~1.5 CPU-s) for
# every fit, to react to nodes being drained; no test drains a node, and there are ~30 fits.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    import psutil
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    # This instance's workers are its raylet's children. ray.shutdown() stops the raylet, and a
    # worker normally exits with it, but a ray::TrainController once outlived a CI run (an
    # orphan of init, 400 MB): whatever of ours is still alive 10 s later is killed by pid.
    raylets = [p for p in psutil.Process().children() if p.name() == "raylet"]
    workers = [w for raylet in raylets for w in raylet.children(recursive=True)]
    ray.shutdown()
    _, alive = psutil.wait_procs(workers, timeout=10)
    for process in alive:
        process.kill()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("moto server did not start")
    yield f"http://127.0.0.1:{port}"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)
    log.close()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the loopback endpoint: (bucket name, boto3 client)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"rqpipe-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name, client


@pytest.fixture(scope="session")
def encoded_run(ray_local, tmp_path_factory):
    """A finished run up to encode, for the train-ar and sample tests to copy: demo shards
    (4 classes), a seeded untrained tiny RQ-VAE in RUN/vae/model, tables with latents."""
    import torch

    from model.rqvae import RQVAE, RQVAEConfig
    from pipeline.demo.data import write_demo_dataset
    from pipeline.stages.encode import EncodeConfig, run_encode_stage
    from pipeline.stages.shard import ShardConfig, run_shard_stage

    root = tmp_path_factory.mktemp("encoded")
    write_demo_dataset(root / "in", per_class=24)
    run = root / "run"
    run_shard_stage(str(root / "in"), str(run), ShardConfig(image_size=32, samples_per_shard=32,
                                                            val_fraction=0.1))  # fmt: skip
    torch.manual_seed(0)
    RQVAE(RQVAEConfig.preset("tiny")).eval().save_pretrained(str(run / "vae" / "model"))
    run_encode_stage(str(run), EncodeConfig(with_latents=True, cpus_per_actor=0.5))
    return run


@pytest.fixture(scope="session")
def classifier_weights(tmp_path_factory) -> str:
    """A randomly initialised demo-sized image classifier folder: the evaluate stage's
    features in the end-to-end runs (evaluate.weights=...)."""
    import torch

    from model.evaluation.classifier import ImageClassifier, ImageClassifierConfig

    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("classifier") / "model")
    ImageClassifier(ImageClassifierConfig(num_classes=4)).save_pretrained(folder)
    return folder


@pytest.fixture
def sampled_run(encoded_run, tmp_path):
    """The encoded run plus a seeded, untrained class-conditional RQ-Transformer in
    RUN/ar/model built on its VAE's codebook."""
    import shutil

    import torch

    from model.rqtransformer import RQTransformer, RQTransformerConfig
    from model.rqvae import RQVAE

    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    vae = RQVAE.from_pretrained(str(run / "vae" / "model"))
    config = RQTransformerConfig.preset("tiny", code_shape=[8, 8, 4], codebook_size=256,
                                        num_classes=4)  # fmt: skip
    torch.manual_seed(0)
    RQTransformer(config, vae.quantizer.codebooks).save_pretrained(str(run / "ar" / "model"))
    return run


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """(a root URI, its Storage): on local disk, then on the loopback S3 endpoint."""
    from pipeline.core.storage import Storage, StorageConfig

    if request.param == "local":
        return str(tmp_path / "root"), Storage()
    bucket, _ = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://{bucket}/root", Storage(StorageConfig(endpoint_url=endpoint))
