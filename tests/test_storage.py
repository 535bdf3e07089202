from pathlib import Path

import pytest

from pipeline.core.manifest import (
    Manifest,
    StageConflict,
    read_manifest,
    stage_status,
    write_manifest,
)
from pipeline.core.storage import Storage, StorageConfig, redact


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root"), Storage()
    bucket, _ = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://{bucket}/root", Storage(StorageConfig(endpoint_url=endpoint))


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


def test_manifest_protocol(root):
    base, storage = root
    planned = Manifest("shard", 1, {"image_size": 32, "encoding": "png"}, {})
    assert stage_status(storage, base, planned) == "resume"
    planned.units, planned.counts = [{"name": "a.tar", "rows": 3, "bytes": 10}], {"ok": 3}
    write_manifest(storage, base, planned)
    assert read_manifest(storage, base) == planned
    assert stage_status(storage, base, Manifest("shard", 1, dict(planned.config), {})) == (
        "up_to_date"
    )
    changed = Manifest("shard", 1, {"image_size": 64, "encoding": "png"}, {"vae": "abc"})
    with pytest.raises(StageConflict, match=r"image_size: 32 -> 64; upstream vae changed"):
        stage_status(storage, base, changed)
    assert stage_status(storage, base, changed, overwrite=True) == "overwrite"


def test_redact_hides_credentials_in_urls():
    assert redact("http://AKIAXXXX:s3cr3t@minio:9000/x failed") == "http://***@minio:9000/x failed"
    assert redact("s3://bucket/key") == "s3://bucket/key"


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
