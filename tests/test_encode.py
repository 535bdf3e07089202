import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.rqvae import RQVAE, RQVAEConfig
from pipeline.core.storage import Storage, StorageConfig
from pipeline.demo.data import write_demo_dataset
from pipeline.formats.codes_table import codes_array, table_metadata
from pipeline.stages.encode import EncodeConfig, decode_shard, run_encode_stage, shards_in_flight
from pipeline.stages.shard import ShardConfig, run_shard_stage
from pipeline.tools.analysis import code_stats, query, read_codes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "in"
    write_demo_dataset(root, per_class=12)
    return root


def prepared_run(demo_images, run: str, storage: StorageConfig, per_shard: int = 16) -> RQVAE:
    """Shards plus an RQ-VAE in RUN/vae/model (a seeded, untrained tiny model)."""
    run_shard_stage(str(demo_images), run, ShardConfig(image_size=32, samples_per_shard=per_shard,
                                                       val_fraction=0.1, storage=storage))  # fmt: skip
    torch.manual_seed(0)
    model = RQVAE(RQVAEConfig.preset("tiny")).eval()
    uri = f"{run}/vae/model"
    model.save_pretrained(uri, Storage(storage).options(uri))
    return model


def expected_codes(model: RQVAE, run: str, storage: StorageConfig) -> dict[str, np.ndarray]:
    """key -> codes, from RQVAE.encode of the shards' images, computed here independently."""
    out = {}
    manifest = json.loads(Storage(storage).read_bytes(f"{run}/shards/_manifest.json"))
    for unit in manifest["units"]:
        decoded = decode_shard(f"{run}/shards/{unit['name']}", 32, storage)
        x = torch.tensor(decoded["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        for key, codes in zip(decoded["keys"], model.encode(x).numpy(), strict=True):
            out[key] = codes
    return out


def test_encode_local_tables(ray_local, demo_images, tmp_path):
    run = str(tmp_path / "run")
    model = prepared_run(demo_images, run, StorageConfig())
    config = EncodeConfig(num_actors=2, with_psnr=True, with_latents=True, batch_size=5,
                          cpus_per_actor=0.5, shards_in_flight=4)  # all shards queued at once  # fmt: skip
    manifest = run_encode_stage(run, config)
    codes_dir = tmp_path / "run" / "codes"
    shards = json.loads((tmp_path / "run" / "shards" / "_manifest.json").read_text())
    assert sorted(p.name for p in codes_dir.glob("*.parquet")) == sorted(
        u["name"].replace(".tar", ".parquet") for u in shards["units"])  # fmt: skip
    assert manifest.counts["rows"] == shards["counts"]["ok"] == 48

    expected = expected_codes(model, run, StorageConfig())
    table = pq.read_table(codes_dir)  # all files, as any reader would
    assert len(table) == 48 and len(set(table.column("key").to_pylist())) == 48
    got = dict(zip(table.column("key").to_pylist(), codes_array(table), strict=True))
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)

    one = pq.read_table(next(codes_dir.glob("train-*.parquet")))
    assert one.schema.field("key").type == pa.string()
    assert one.schema.field("label").type == pa.int32()
    assert one.schema.field("caption").type == pa.string()
    assert one.schema.field("codes").type == pa.list_(pa.uint16(), 8 * 8 * 4)
    assert one.schema.field("psnr").type == pa.float32()
    assert one.schema.field("latents").type == pa.list_(pa.float16(), 8 * 8 * 32)
    first = one.slice(0, 1)
    decoded = decode_shard(str(next(codes_dir.glob("train-*.parquet"))).replace(
        "/codes/", "/shards/").replace(".parquet", ".tar"), 32, StorageConfig())  # fmt: skip
    index = decoded["keys"].index(first.column("key")[0].as_py())
    x = torch.tensor(decoded["images"][index : index + 1]).permute(0, 3, 1, 2).float() / 127.5 - 1
    stored = np.asarray(first.column("latents")[0].as_py(), np.float32)
    assert np.allclose(stored, model.encode_latents(x).detach().numpy().ravel(), atol=2e-3)
    keys = one.column("key").to_pylist()
    assert keys == sorted(keys)
    meta = table_metadata(one.schema)
    assert meta["code_shape"] == [8, 8, 4] and meta["codebook_size"] == 256
    assert meta["format_version"] == 2 and meta["vae_fingerprint"]
    assert set(one.column("label").to_pylist()) <= {0, 1, 2, 3}
    frame = one.to_pandas()  # pandas reads it as-is
    assert len(frame) == len(one) and frame["psnr"].between(5, 60).all()

    before = {p.name: p.stat().st_mtime_ns for p in codes_dir.iterdir()}
    run_encode_stage(run, config)  # a no-op
    assert {p.name: p.stat().st_mtime_ns for p in codes_dir.iterdir()} == before


def test_shards_in_flight_follow_the_free_cores():
    auto = EncodeConfig()  # cpus_per_actor 1
    assert shards_in_flight(auto, actors=1, cluster_cpus=2) == 2  # the demo: one ahead
    assert shards_in_flight(auto, actors=1, cluster_cpus=16) == 16  # a 16-core GPU node
    assert shards_in_flight(auto, actors=8, cluster_cpus=96) == 12  # 88 free cores, 8 actors
    assert shards_in_flight(auto, actors=8, cluster_cpus=8) == 2  # no free core: still one ahead
    assert shards_in_flight(auto, actors=1, cluster_cpus=256) == 16  # bounded: decoded memory
    assert shards_in_flight(EncodeConfig(shards_in_flight=3), 1, 256) == 3
    for bad in (1, -1):
        with pytest.raises(ValueError, match="shards_in_flight"):
            EncodeConfig(shards_in_flight=bad)


def test_bf16_encode_runs_the_bf16_path_and_is_fingerprinted(ray_local, demo_images, tmp_path):
    run = str(tmp_path / "run")
    model = prepared_run(demo_images, run, StorageConfig())
    manifest = run_encode_stage(run, EncodeConfig(dtype="bfloat16", cpus_per_actor=0.5))
    assert manifest.config["dtype"] == "bfloat16"  # an output field: other codes, other tables
    table = pq.read_table(tmp_path / "run" / "codes")
    got = dict(zip(table.column("key").to_pylist(), codes_array(table), strict=True))
    expected = expected_codes(model, run, StorageConfig())
    same = np.mean([np.mean(got[k] == expected[k]) for k in expected])
    assert 0.5 < same < 1.0  # bf16 activations move some codes of even an untrained model
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        EncodeConfig(dtype="float16")


def test_encode_on_s3(ray_local, demo_images, s3_bucket, s3_endpoint):
    bucket, _client = s3_bucket
    storage = StorageConfig(endpoint_url=s3_endpoint)
    run = f"s3://{bucket}/run"
    model = prepared_run(demo_images, run, storage)
    manifest = run_encode_stage(run, EncodeConfig(cpus_per_actor=0.5, storage=storage))
    filesystem, path = Storage(storage).arrow_fs(f"{run}/codes")
    files = [f"{path}/{u['name']}" for u in manifest.units]
    table = pa.concat_tables(pq.read_table(f, filesystem=filesystem) for f in files)
    expected = expected_codes(model, run, storage)
    got = dict(zip(table.column("key").to_pylist(), codes_array(table), strict=True))
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)

    counted = query(Storage(storage), run, "SELECT count(*) AS n FROM codes")
    assert counted.to_pylist() == [{"n": 48}]
    assert code_stats(read_codes(Storage(storage), f"{run}/codes"))["rows"] == 48


@pytest.mark.slow
def test_killed_driver_resumes_without_duplicates(ray_local, demo_images, tmp_path):
    run = tmp_path / "run"
    prepared_run(demo_images, str(run), StorageConfig(), per_shard=2)
    address = ray_local.get_runtime_context().gcs_address
    command = [sys.executable, str(REPO / "jobs" / "encode.py"), "--run-dir", str(run),
               "--ray-address", address, "cpus_per_actor=0.5", "batch_size=1"]  # fmt: skip
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while len(list((run / "codes").glob("*.parquet"))) < 3 and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (run / "codes" / "_manifest.json").exists(), "killed too late to test resume"

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "already done" in resumed.stdout
    table = pq.read_table(run / "codes")
    assert len(table) == 48 and len(set(table.column("key").to_pylist())) == 48

    clean = tmp_path / "clean"
    clean.mkdir()
    for sub in ("shards", "vae"):
        os.symlink(run / sub, clean / sub)
    run_encode_stage(str(clean), EncodeConfig(cpus_per_actor=0.5))
    for path in (clean / "codes").glob("*.parquet"):
        assert pq.read_table(path).equals(pq.read_table(run / "codes" / path.name)), path.name
