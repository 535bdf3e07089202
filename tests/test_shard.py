import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.core.manifest import StageConflict
from pipeline.core.storage import Storage, StorageConfig
from pipeline.stages.shard import ShardConfig, run_shard_stage
from tests.corpus import corpus, good_image, write_corpus

REPO = Path(__file__).resolve().parents[1]


def config(**kw) -> ShardConfig:
    return ShardConfig(**{"image_size": 32, "samples_per_shard": 4, "val_fraction": 0.3,
                          "cpus_per_task": 0.5, **kw})  # fmt: skip


def read_samples(urls: list[str]) -> list[dict]:
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return list(dataset)


def local_tars(shards: Path) -> list[str]:
    return sorted(str(p) for p in shards.glob("*.tar"))


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_local_end_to_end_with_bad_inputs(ray_local, tmp_path):
    entries = write_corpus(tmp_path / "in")
    accepted = sorted(k for k, (_, reason) in entries.items() if reason is None)
    manifest = run_shard_stage(str(tmp_path / "in"), str(tmp_path / "run"), config())
    shards = tmp_path / "run" / "shards"

    assert manifest.counts == {"seen": 14, "ok": len(accepted), "rejected": 5,
                               "shards": len(manifest.units)}  # fmt: skip
    rejects = pq.read_table(shards / "rejects.parquet").to_pylist()
    by_name = {Path(r["source"]).name: r["reason"] for r in rejects}
    for rel, (_, reason) in entries.items():
        if reason is not None:
            assert reason in by_name[Path(rel).name], (rel, by_name)
    assert json.loads((shards / "labels.json").read_text()) == {"cats": 0, "dogs": 1}
    written = json.loads((shards / "_manifest.json").read_text())
    assert written["fingerprint"] and written["counts"] == manifest.counts

    samples = read_samples(local_tars(shards))
    assert len(samples) == len(accepted) == sum(u["rows"] for u in manifest.units)
    assert len({s["__key__"] for s in samples}) == len(samples)
    metas = {Path(json.loads(s["json"])["source"]).relative_to(tmp_path / "in").as_posix():
             (json.loads(s["json"]), s) for s in samples}  # fmt: skip
    assert sorted(metas) == accepted
    for rel, (meta, sample) in metas.items():
        assert meta["label"] == (0 if rel.startswith("cats/") else 1)
        assert Image.open(io.BytesIO(sample["png"])).size == (32, 32)
    rotated_meta, rotated = metas["dogs/rotated.jpg"]
    assert (rotated_meta["width"], rotated_meta["height"]) == (20, 40)
    pixels = np.asarray(Image.open(io.BytesIO(rotated["png"])).convert("RGB")).astype(int)
    assert pixels[4, 16, 0] > 200 and pixels[28, 16, 2] > 200  # red on top, blue below
    splits = {u["name"].split("-")[0] for u in manifest.units}
    assert splits == {"train", "val"}

    import ray

    dataset = ray.data.read_webdataset(str(shards), file_extensions=["tar"])
    assert dataset.count() == len(accepted)

    # Re-running a finished stage rewrites nothing, and does not even list its input: it runs
    # with the input folder gone.
    before = snapshot(shards)
    shutil.move(tmp_path / "in", tmp_path / "away")
    run_shard_stage(str(tmp_path / "in"), str(tmp_path / "run"), config())
    assert snapshot(shards) == before
    with pytest.raises(FileNotFoundError, match="no files under"):  # unless asked to re-list
        run_shard_stage(str(tmp_path / "in"), str(tmp_path / "run"), config(rescan_input=True))
    shutil.move(tmp_path / "away", tmp_path / "in")
    run_shard_stage(str(tmp_path / "in"), str(tmp_path / "run"), config(rescan_input=True))

    # Deterministic: another run of the same input gives byte-identical shards.
    run_shard_stage(str(tmp_path / "in"), str(tmp_path / "run2"), config())
    again = snapshot(tmp_path / "run2" / "shards")
    assert {k: v[1] for k, v in again.items()} == {k: v[1] for k, v in before.items()}

    # Another config is refused, naming the change, unless overwrite.
    with pytest.raises(StageConflict, match=r"image_size: 32 -> 16.*--overwrite"):
        run_shard_stage(str(tmp_path / "in"), str(tmp_path / "run"), config(image_size=16))
    run_shard_stage(str(tmp_path / "in"), str(tmp_path / "run"), config(image_size=16),
                    overwrite=True)  # fmt: skip
    first = read_samples(local_tars(shards))[0]
    assert Image.open(io.BytesIO(first["png"])).size == (16, 16)


def test_listings_and_resharding(ray_local, tmp_path):
    images = tmp_path / "data" / "img"
    images.mkdir(parents=True)
    rows = ["path,label,caption"]
    for i in range(6):
        good_image(i).save(images / f"{i}.png")
        rows.append(f"img/{i}.png,{'bird' if i % 2 else 'fish'},a picture number {i}")
    rows.append("img/missing.png,bird,gone")
    (tmp_path / "data" / "list.csv").write_text("\n".join(rows) + "\n")
    manifest = run_shard_stage(str(tmp_path / "data" / "list.csv"), str(tmp_path / "run"),
                               config(val_fraction=0.0))  # fmt: skip
    assert manifest.counts["ok"] == 6 and manifest.counts["rejected"] == 1
    # A listing is identified by its content: the same bytes are up to date, others refused.
    assert run_shard_stage(str(tmp_path / "data" / "list.csv"), str(tmp_path / "run"),
                           config(val_fraction=0.0)).fingerprint == manifest.fingerprint  # fmt: skip
    (tmp_path / "data" / "list.csv").write_text("\n".join([*rows, "img/0.png,bird,again"]) + "\n")
    with pytest.raises(StageConflict, match="input_version"):
        run_shard_stage(str(tmp_path / "data" / "list.csv"), str(tmp_path / "run"),
                        config(val_fraction=0.0))  # fmt: skip
    rejects = pq.read_table(tmp_path / "run" / "shards" / "rejects.parquet").to_pylist()
    assert {r["reason"] for r in rejects} == {"file not found"}
    # A path listed twice: the first row (in a fixed order) is the sample, the other a reject.
    again = run_shard_stage(str(tmp_path / "data" / "list.csv"), str(tmp_path / "run"),
                            config(val_fraction=0.0), overwrite=True)  # fmt: skip
    assert again.counts == {"seen": 8, "ok": 6, "rejected": 2, "shards": again.counts["shards"]}
    rejects = pq.read_table(tmp_path / "run" / "shards" / "rejects.parquet").to_pylist()
    assert sorted(r["reason"].split(":")[0] for r in rejects) == ["duplicate", "file not found"]
    samples = read_samples(local_tars(tmp_path / "run" / "shards"))
    metas = [json.loads(s["json"]) for s in samples]
    assert {m["caption"] for m in metas} == {f"a picture number {i}" for i in range(6)}
    assert {m["label"] for m in metas} == {0, 1}  # bird -> 0, fish -> 1

    import pyarrow as pa

    table = pa.table({"path": [str(images / f"{i}.png") for i in range(3)], "label": [7, 8, 9]})
    pq.write_table(table, tmp_path / "data" / "list.parquet")
    manifest = run_shard_stage(str(tmp_path / "data" / "list.parquet"), str(tmp_path / "run-pq"),
                               config(val_fraction=0.0))  # fmt: skip
    labels = sorted(json.loads(s["json"])["label"]
                    for s in read_samples(local_tars(tmp_path / "run-pq" / "shards")))  # fmt: skip
    assert labels == [7, 8, 9]

    # Re-shard existing tars (e.g. into larger shards, another size).
    tars = tmp_path / "tars"
    tars.mkdir()
    for tar in local_tars(tmp_path / "run" / "shards"):
        shutil.copy(tar, tars)
    manifest = run_shard_stage(str(tars), str(tmp_path / "run-re"),
                               config(val_fraction=0.0, samples_per_shard=100, image_size=8))  # fmt: skip
    assert manifest.counts == {"seen": 6, "ok": 6, "rejected": 0, "shards": 1}
    resharded = read_samples(local_tars(tmp_path / "run-re" / "shards"))
    assert {json.loads(s["json"])["caption"] for s in resharded} == {m["caption"] for m in metas}


def test_a_listing_is_read_in_blocks_of_its_size_by_workers_without_torch(ray_local, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    """The planning's cold start: a small listing is one read task (Ray Data would split a
    lone file into 2 blocks a CPU, each a worker to start), and a shard worker imports no
    torch (1 s a worker on 2 cores)."""
    import math

    from pipeline.stages.shard import listing

    rows = ["path,label"] + [f"img/{i}.png,bird" for i in range(200)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    storage, uri = Storage(StorageConfig()), str(tmp_path / "list.csv")
    assert listing.input_rows(storage, uri, 0.0, 1)[0].materialize().num_blocks() == 1
    monkeypatch.setattr(listing, "CSV_BLOCK_BYTES", 1000)  # a large listing, in miniature
    blocks = math.ceil((tmp_path / "list.csv").stat().st_size / 1000)
    assert listing.input_rows(storage, uri, 0.0, 1)[0].materialize().num_blocks() == blocks > 1
    imports = subprocess.run([sys.executable, "-c", "import sys, pipeline.stages.shard; "
                              "print('torch' in sys.modules)"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert imports.stdout.strip() == "False", imports.stderr


def test_s3_end_to_end(ray_local, s3_bucket, s3_endpoint, tmp_path):
    bucket, client = s3_bucket
    for rel, (data, _) in corpus().items():
        client.put_object(Bucket=bucket, Key=f"in/{rel}", Body=data)
    cfg = config(storage=StorageConfig(endpoint_url=s3_endpoint))
    manifest = run_shard_stage(f"s3://{bucket}/in", f"s3://{bucket}/run", cfg)
    assert manifest.counts["seen"] == 14 and manifest.counts["rejected"] == 5

    def objects():
        listing = client.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]
        return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listing}

    keys = objects()
    assert "run/shards/_manifest.json" in keys and "run/shards/rejects.parquet" in keys

    # webdataset has no s3:// scheme: give it one backed by fsspec with the endpoint.
    storage = Storage(cfg.storage)
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(
        url, mode, **storage.options(url)).open()  # fmt: skip
    tar_uris = sorted(f"s3://{bucket}/{k}" for k in keys if k.endswith(".tar"))
    assert len(read_samples(tar_uris)) == manifest.counts["ok"]

    import ray

    filesystem, path = storage.arrow_fs(f"s3://{bucket}/run/shards")
    dataset = ray.data.read_webdataset(path, filesystem=filesystem, file_extensions=["tar"])
    assert dataset.count() == manifest.counts["ok"]

    run_shard_stage(f"s3://{bucket}/in", f"s3://{bucket}/run", cfg)
    assert objects() == keys, "a finished stage re-run must rewrite no object"

    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    for key in keys:
        if not key.endswith(".tar"):
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert secret not in body, f"credentials leaked into {key}"


def _stats_files(shards: Path) -> list[Path]:
    return list(shards.glob("*.stats.json")) if shards.exists() else []


@pytest.mark.slow
def test_killed_driver_resumes_to_the_same_shards(ray_local, tmp_path):
    source = tmp_path / "in"
    for i in range(120):
        (source / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        good_image(i, (256, 256)).save(source / f"c{i % 3}" / f"{i:03d}.png")
    for i in range(0, 120, 20):  # rejects in some shards: the resumed rejects.parquet is compared
        (source / f"c{i % 3}" / f"{i:03d}-bad.png").write_bytes(b"not an image")
    overrides = ["image_size=32", "samples_per_shard=2", "cpus_per_task=0.5"]
    address = ray_local.get_runtime_context().gcs_address
    run = tmp_path / "run"
    command = [sys.executable, str(REPO / "jobs" / "shard.py"), "--input", str(source),
               "--run-dir", str(run), "--ray-address", address, *overrides]  # fmt: skip
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while len(_stats_files(run / "shards")) < 3 and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done_at_kill = len(_stats_files(run / "shards"))
    assert not (run / "shards" / "_manifest.json").exists(), "killed too late to test resume"
    assert done_at_kill >= 3

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "already done" in resumed.stdout

    clean = run_shard_stage(str(source), str(tmp_path / "clean"),
                            ShardConfig(image_size=32, samples_per_shard=2))  # fmt: skip
    got, want = snapshot(run / "shards"), snapshot(tmp_path / "clean" / "shards")
    assert sorted(got) == sorted(want), "same files, no temporaries left behind"
    for name in want:
        if name != "_manifest.json":
            assert got[name][1] == want[name][1], name
    assert json.loads(got["_manifest.json"][1])["units"] == clean.units
    assert clean.counts["seen"] == 126 and clean.counts["ok"] == 120
    assert len(pq.read_table(run / "shards" / "rejects.parquet")) == 6
    assert clean.counts["shards"] == len(clean.units) > done_at_kill


def test_rejects_are_written_in_shard_order_whatever_order_the_shards_finish(tmp_path):
    from pipeline.stages.shard import rejects

    def stats(shard: str, count: int) -> dict:
        return {"shard": shard, "rejects": [{"source": f"{shard}/{i}", "reason": "r"}
                                            for i in range(count)]}  # fmt: skip

    shards = [("train-000002", 3), ("train-000000", 0), ("val-000000", 2), ("train-000001", 4)]
    written = []
    for order in (shards, shards[::-1]):
        spill = rejects.RejectsSpill()
        assert [spill.add(stats(*s))["rejected"] for s in order] == [n for _, n in order]
        uri = str(tmp_path / f"{len(written)}" / "rejects.parquet")
        spill.write(Storage(), uri, sorted(name for name, _ in shards))
        spill.close()
        written.append(Path(uri).read_bytes())
    assert written[0] == written[1]
    table = pq.read_table(tmp_path / "0" / "rejects.parquet")
    assert table.column("source").to_pylist() == [
        *(f"train-000001/{i}" for i in range(4)), *(f"train-000002/{i}" for i in range(3)),
        *(f"val-000000/{i}" for i in range(2))]  # fmt: skip
    empty = rejects.RejectsSpill()
    empty.write(Storage(), str(tmp_path / "none.parquet"), [])
    assert pq.read_table(tmp_path / "none.parquet").schema == rejects.SCHEMA


@pytest.mark.slow
def test_cli_errors_are_actionable(ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    missing = subprocess.run([sys.executable, str(REPO / "jobs" / "shard.py"), "--input",
                              str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "run"),
                              "--ray-address", address],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 1 and "no files under" in missing.stderr
    bad_key = subprocess.run([sys.executable, str(REPO / "jobs" / "shard.py"), "--input", "x",
                              "--run-dir", "y", "image_sise=3"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad_key.returncode == 2 and "image_sise" in bad_key.stderr


def test_class_sorted_input_gives_mixed_shards(ray_local, tmp_path):
    """ImageNet-style class folders, listed in path order, must not give one class per shard:
    a shard is a hash bucket of the keys (about samples_per_shard samples), in key order."""
    from pipeline.demo.data import DEMO_CLASSES, write_demo_dataset

    write_demo_dataset(tmp_path / "in", per_class=32, size=32)
    run = tmp_path / "run"
    manifest = run_shard_stage(str(tmp_path / "in"), str(run),
                               config(samples_per_shard=32, val_fraction=0.0))  # fmt: skip
    tars = local_tars(run / "shards")
    assert len(tars) == 4 and manifest.counts["ok"] == 128
    for tar in tars:
        samples = read_samples([tar])
        labels = [json.loads(s["json"])["label"] for s in samples]
        assert 16 <= len(labels) <= 48 and set(labels) == set(range(len(DEMO_CLASSES))), labels
        keys = [s["__key__"] for s in samples]
        assert keys == sorted(keys)
