import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.manifest import (
    Manifest,
    StageConflict,
    begin_stage,
    read_manifest,
    write_manifest,
)
from pipeline.core.storage import Storage, StorageConfig, redact


@pytest.fixture
def root(storage_root):
    return storage_root


def test_write_read_list_glob_exists(root):
    base, storage = root
    storage.write_bytes(f"{base}/a/x.tar", b"1")
    storage.write_bytes(f"{base}/a/y.json", b"22")
    storage.write_bytes(f"{base}/b/z.tar", b"333")
    assert storage.read_bytes(f"{base}/b/z.tar") == b"333"
    assert storage.exists(f"{base}/a/x.tar") and not storage.exists(f"{base}/a/nope")
    assert storage.list_files(base) == [(f"{base}/a/x.tar", 1), (f"{base}/a/y.json", 2),
                                        (f"{base}/b/z.tar", 3)]  # fmt: skip
    assert storage.glob(f"{base}/*/*.tar") == [f"{base}/a/x.tar", f"{base}/b/z.tar"]
    assert storage.list_files(f"{base}/missing") == []
    filesystem, path = storage.arrow_fs(f"{base}/b/z.tar")
    with filesystem.open_input_stream(path) as f:  # the pyarrow view of the same object
        assert f.read() == b"333"
    storage.remove_tree(f"{base}/a")
    assert [uri for uri, _ in storage.list_files(base)] == [f"{base}/b/z.tar"]


KILLED_MID_WRITE = """
import os, signal, sys
from model.weights import fileio
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # dies before the rename
fileio.write_bytes_atomic(sys.argv[1], open(sys.argv[2], "rb").read())
"""


def _parquet_bytes(keys: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"key": keys}), buffer)
    return buffer.getvalue()


def test_a_writer_killed_mid_write_adds_no_rows_and_its_leftover_is_swept(tmp_path):
    """A node lost while its actor wrote a table (seen in CI once: 50 rows for 48 images): the
    complete table plus the killed writer's temporary must still read as one copy."""
    import duckdb
    import pyarrow.parquet as pq

    storage, folder = Storage(StorageConfig()), tmp_path / "codes"
    storage.write_bytes(str(folder / "a.parquet"), _parquet_bytes(["x", "y"]))
    (tmp_path / "payload").write_bytes(_parquet_bytes(["x", "y"]))  # the retry's own copy
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(folder / "a.parquet"),
                             str(tmp_path / "payload")], cwd=Path(__file__).parents[1])  # fmt: skip
    assert killed.returncode == -9
    left = [p.name for p in folder.iterdir() if p.name != "a.parquet"]
    assert len(left) == 1 and left[0].startswith(".a.parquet.tmp-"), left
    assert pq.read_table(folder).column("key").to_pylist() == ["x", "y"]
    sql = f"SELECT count(*) FROM read_parquet('{folder}/*.parquet')"
    assert duckdb.connect().execute(sql).fetchone()[0] == 2

    write_manifest(storage, str(folder), Manifest("encode", 1, {}, {}))
    assert sorted(p.name for p in folder.iterdir()) == ["_manifest.json", "a.parquet"]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        Storage(StorageConfig()).write_bytes(str(tmp_path / "a.bin"), "not bytes")
    assert list(tmp_path.iterdir()) == []


def _finish(storage, base, planned):
    planned.units, planned.counts = [{"name": "a.tar", "rows": 3, "bytes": 10}], {"ok": 3}
    write_manifest(storage, base, planned)


def test_manifest_protocol(root):
    base, storage = root
    planned = Manifest("shard", 1, {"image_size": 32, "encoding": "png"}, {})
    assert begin_stage(storage, base, planned) is None  # nothing there: run
    _finish(storage, base, planned)
    assert read_manifest(storage, base) == planned
    same = Manifest("shard", 1, dict(planned.config), {})
    assert begin_stage(storage, base, same) == planned  # up to date
    changed = Manifest("shard", 1, {"image_size": 64, "encoding": "png"}, {"vae": "abc"})
    with pytest.raises(StageConflict, match=r"image_size: 32 -> 64; upstream vae changed"):
        begin_stage(storage, base, changed)
    storage.write_bytes(f"{base}/_lease.json", b"{}")  # held by the caller: kept
    assert begin_stage(storage, base, changed, overwrite=True) is None
    assert read_manifest(storage, base) is None
    assert [u.rsplit("/", 1)[-1] for u, _ in storage.list_files(base)] == ["_lease.json",
                                                                          "_started.json"]  # fmt: skip


def test_an_unfinished_stage_resumes_only_with_its_config(root):
    base, storage = root
    started = Manifest("train-vae", 1, {"lr": 1e-3, "steps": 100, "num_workers": 1}, {"shard": "s"})
    assert begin_stage(storage, base, started, resumable=("steps", "num_workers")) is None
    other_lr = Manifest("train-vae", 1, {**started.config, "lr": 2e-3}, {"shard": "s"})
    with pytest.raises(StageConflict, match=r"unfinished train-vae .* lr: 0.001 -> 0.002"):
        begin_stage(storage, base, other_lr, resumable=("steps", "num_workers"))
    fewer = Manifest("train-vae", 1, {**started.config, "steps": 50}, {"shard": "s"})
    with pytest.raises(StageConflict, match=r"steps: 100 -> 50"):
        begin_stage(storage, base, fewer, resumable=("steps", "num_workers"))
    # Safe changes continue, and are recorded.
    more = Manifest("train-vae", 1, {**started.config, "steps": 200, "num_workers": 2},
                    {"shard": "s"})  # fmt: skip
    assert begin_stage(storage, base, more, resumable=("steps", "num_workers")) is None
    record = json.loads(storage.read_bytes(f"{base}/_started.json"))
    assert record["config"]["steps"] == 200
    assert record["history"][0]["changes"] == ["num_workers: 1 -> 2", "steps: 100 -> 200"]


def test_a_finished_stage_is_extended_by_raising_steps(root):
    base, storage = root
    planned = Manifest("train-ar", 1, {"lr": 1e-3, "steps": 100}, {})
    begin_stage(storage, base, planned, resumable=("steps",))
    _finish(storage, base, planned)
    longer = Manifest("train-ar", 1, {"lr": 1e-3, "steps": 300}, {})
    assert begin_stage(storage, base, longer, resumable=("steps",)) is None
    assert read_manifest(storage, base) is None  # unfinished again until the extension ends
    record = json.loads(storage.read_bytes(f"{base}/_started.json"))
    assert record["history"] == [{"at": record["history"][0]["at"], "from": "finished",
                                  "changes": ["steps: 100 -> 300"]}]  # fmt: skip
    with pytest.raises(StageConflict, match="steps: 300 -> 200"):
        begin_stage(storage, base, Manifest("train-ar", 1, {"lr": 1e-3, "steps": 200}, {}),
                    resumable=("steps",))  # fmt: skip


def test_redact_hides_credentials_in_urls():
    assert redact("http://AKIAXXXX:s3cr3t@minio:9000/x failed") == "http://***@minio:9000/x failed"
    assert redact("s3://bucket/key") == "s3://bucket/key"
    config = StorageConfig(endpoint_url="http://AKIAXXXX:s3cr3t@minio:9000")
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in str({"storage": config})


def test_unreachable_endpoint_is_recognised_and_named():
    from pipeline.core.storage import unreachable_endpoint

    remote = RuntimeError(
        "ray.exceptions.RayTaskError(EndpointConnectionError): ... botocore.exceptions."
        'EndpointConnectionError: Could not connect to the endpoint URL: "http://10.0.0.5:9000/b/k"'
    )
    assert unreachable_endpoint(remote) == "http://10.0.0.5:9000"
    arrow = OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7")
    configured = Storage(StorageConfig(endpoint_url="http://minio:9000"))
    assert unreachable_endpoint(arrow, configured) == "http://minio:9000"
    try:
        try:
            raise arrow
        except OSError as cause:
            raise RuntimeError("stage failed") from cause
    except RuntimeError as wrapped:
        assert unreachable_endpoint(wrapped, configured) == "http://minio:9000"
    assert unreachable_endpoint(ConnectionRefusedError("Ray GCS: Connection refused")) is None


def test_local_uris_are_resolved_against_the_callers_directory(tmp_path, monkeypatch):
    from pipeline.core.storage import absolute

    monkeypatch.chdir(tmp_path)
    assert absolute("runs/demo") == str(tmp_path / "runs" / "demo")
    assert absolute("./runs/../runs/x/") == str(tmp_path / "runs" / "x")
    assert absolute("file://runs/demo") == f"file://{tmp_path}/runs/demo"
    assert absolute("/abs/path") == "/abs/path"
    assert absolute("s3://bucket/runs/demo") == "s3://bucket/runs/demo"  # left as given
    assert absolute("~/x") == str(Path.home() / "x")


def test_an_unreachable_endpoint_ends_a_command_with_exit_3_naming_it(ray_local, tmp_path):
    """What an operator sees of an endpoint that is down: exit code 3, the endpoint named and
    what to do, no traceback. (Runs whose store outage ends them mid-stage, in actors and
    Train workers, are checked the same way by the fault soak, bench/chaos.py.)"""
    import os
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    # no retries: the message is what is tested, not botocore's backoff
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}  # fmt: skip
    address = ray_local.get_runtime_context().gcs_address
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "train-vae", "--run-dir",
                             "s3://bucket/run", "--ray-address", address,
                             f"storage.endpoint_url={endpoint}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 3, result.stderr[-3000:]
    assert f"cannot reach the object store at {endpoint}" in result.stderr
    assert "run the same command again" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def _fails(row):
    raise ConnectionRefusedError("no endpoint")


def test_a_failed_dataset_reaches_its_stage_without_ray_datas_stack_traces(ray_local, capfd):
    """Ray Data's console gets no ERROR record of a dataset whose exception the stage reports
    itself (the fault soak saw a store outage during shard print 200 lines before the CLI's
    one); the exception still reaches the caller."""
    import ray

    from pipeline.core.ray_runtime import init_ray

    init_ray()  # Ray is up (this session's instance): installs the console filter only
    with pytest.raises(Exception, match="no endpoint"):
        ray.data.range(4).map(_fails).take_all()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ERROR" not in err, err[-2000:]
