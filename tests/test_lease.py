"""One writer per stage dir: a lease held by a real second process, on local disk and on S3
(moto's server): refused while held and renewed, taken over once its holder is killed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.core.lease import Lease, StageBusy
from pipeline.core.storage import Storage, StorageConfig

HOLDER = """
import sys, time
from pipeline.core.lease import Lease
from pipeline.core.storage import Storage, StorageConfig
lease = Lease(Storage(StorageConfig(endpoint_url=sys.argv[2] or None)), sys.argv[1], sys.argv[4],
              ttl_s=float(sys.argv[3]))
lease.acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(params=["local", "s3"])
def stage_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run" / "vae"), ""
    bucket, _ = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/run/vae", request.getfixturevalue("s3_endpoint")


def _hold(uri: str, endpoint: str, ttl_s: float, stage: str = "train-vae",
          script: str = HOLDER) -> subprocess.Popen:  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", script, uri, endpoint, str(ttl_s), stage],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


# A driver that holds the GIL for 6 s (a C call made through ctypes.PyDLL keeps it, as a long
# sort or a C extension does), four times the lease's TTL.
STALLED = HOLDER.replace(
    "time.sleep(600)",
    """import ctypes
print("stalling", flush=True)
ctypes.PyDLL(None).sleep(6)
time.sleep(600)""",
)


def test_a_driver_that_holds_the_gil_past_the_ttl_keeps_its_lease(tmp_path):
    """The heartbeat renews from a process of its own: a driver stalled in a GIL-holding call
    for four TTLs still holds the lease, and a second writer is refused throughout (a
    heartbeat thread would have been starved: the lease expired and was taken over)."""
    uri = str(tmp_path / "run" / "codes")
    holder = _hold(uri, "", ttl_s=1.5, stage="encode", script=STALLED)
    try:
        assert holder.stdout.readline().strip() == "stalling"
        for _ in range(4):
            time.sleep(1.2)
            with pytest.raises(StageBusy, match="another encode run"):
                Lease(Storage(), uri, "encode").acquire()
        assert holder.poll() is None  # still stalled or just past it: it never let go
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def test_a_second_writer_is_refused_while_the_holder_lives(stage_dir, capsys):
    uri, endpoint = stage_dir
    storage = Storage(StorageConfig(endpoint_url=endpoint or None))
    holder = _hold(uri, endpoint, ttl_s=1.5)
    try:
        time.sleep(2.5)  # past one TTL: only the heartbeat keeps the lease
        with pytest.raises(StageBusy, match=rf"another train-vae run \(host \S+, pid {holder.pid}\)"
                                            r"; its lease expires at 20\d\d-"):  # fmt: skip
            Lease(storage, uri, "train-vae").acquire()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # no release: the lease stays behind
        holder.wait()
    # Its process is gone from this host: a re-submitted job need not wait for the expiry.
    mine = Lease(storage, uri, "train-vae")
    mine.acquire()
    assert f"taking over the lease of pid {holder.pid}, which is no longer running" in (
        capsys.readouterr().out)  # fmt: skip
    with pytest.raises(StageBusy):  # and now we are the holder others are refused by
        Lease(storage, uri, "train-vae").acquire()
    mine.release()
    assert not storage.exists(f"{uri}/_lease.json")


def test_a_lease_from_another_host_is_taken_over_once_expired(stage_dir, capsys):
    uri, endpoint = stage_dir
    storage = Storage(StorageConfig(endpoint_url=endpoint or None))
    now = time.time()
    storage.write_bytes(f"{uri}/_lease.json", json.dumps({
        "owner": "elsewhere", "stage": "train-vae", "host": "node-7", "pid": 1,
        "heartbeat": now, "expires": now + 1.5, "expires_utc": "soon"}).encode())  # fmt: skip
    with pytest.raises(StageBusy, match=r"host node-7, pid 1\); its lease expires at soon"):
        Lease(storage, uri, "train-vae").acquire()
    time.sleep(1.6)
    mine = Lease(storage, uri, "train-vae")
    mine.acquire()
    assert "taking over the expired lease of host node-7 pid 1" in capsys.readouterr().out
    assert json.loads(storage.read_bytes(f"{uri}/_lease.json"))["owner"] == mine.owner
    mine.release()


def test_a_stage_refuses_to_start_while_another_run_holds_its_directory(tmp_path):
    from pipeline.stages.shard import ShardConfig, run_shard_stage

    holder = _hold(str(tmp_path / "run" / "shards"), "", ttl_s=30, stage="shard")
    try:
        with pytest.raises(StageBusy, match=rf"run/shards is being written by another shard run "
                                            rf"\(host \S+, pid {holder.pid}\)"):  # fmt: skip
            run_shard_stage(str(tmp_path), str(tmp_path / "run"), ShardConfig())
        assert not (tmp_path / "run" / "shards" / "_started.json").exists()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


TAKER = """
import sys, time
from pipeline.core.lease import Lease, StageBusy
from pipeline.core.storage import Storage, StorageConfig
lease = Lease(Storage(StorageConfig(endpoint_url=sys.argv[2] or None)), sys.argv[1], "train-vae")
while time.time() < float(sys.argv[3]):  # both takers start together
    pass
try:
    lease._swap(take=True)  # the compare-and-swap alone, without the heartbeat thread
    print("won")
except StageBusy:
    print("refused")
"""


def test_two_processes_racing_for_an_expired_lease_one_wins(stage_dir):
    uri, endpoint = stage_dir
    storage = Storage(StorageConfig(endpoint_url=endpoint or None))
    for _ in range(2):
        storage.write_bytes(f"{uri}/_lease.json", json.dumps({
            "owner": "gone", "stage": "train-vae", "host": "node-7", "pid": 1,
            "heartbeat": 0, "expires": 0, "expires_utc": "long ago"}).encode())  # fmt: skip
        start = time.time() + 2.5  # after both have imported
        takers = [subprocess.Popen([sys.executable, "-c", TAKER, uri, endpoint, str(start)],
                                   stdout=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
        outcomes = sorted(t.communicate(timeout=60)[0].split()[-1] for t in takers)
        assert outcomes == ["refused", "won"], outcomes
