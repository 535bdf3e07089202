"""One writer per stage directory: a lease file, `_lease.json`, on local disk or an object store.

A stage holds the lease of its directory (RUN/vae, RUN/codes, ...) while it runs and renews it
every `ttl_s / 3` seconds from a heartbeat process of its own: a driver busy in a long call
that holds the GIL (a sort of millions of keys, a C extension) would starve a heartbeat thread
past the TTL and let a second writer in; a process is never starved. It stops when the lease is
released, and by itself when the driver's process is gone, so a killed driver's lease expires. A second run of the same stage on the same
run dir is refused with a message naming the holder and when its lease expires. A lease whose
holder died (killed, node lost) expires after `ttl_s` without a heartbeat and is taken over;
at once when the holder was a process on this host that no longer runs (a killed driver
re-submitted on the same head node).

Taking and renewing are compare-and-swap, so two takers cannot both win:
- object stores: a conditional PUT (`If-None-Match: *` to create, `If-Match: <etag>` to
  replace), which AWS S3, MinIO and moto honour;
- local disk: the read-check-write runs under `flock` on the stage folder (one machine, or NFS
  with working locks).
Clocks: expiry compares the writer's wall clock with the reader's, so hosts' clocks should
agree to well within `ttl_s` (NTP does).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, TypeVar

from pipeline.core.storage import Storage, StorageConfig, is_local, join

LEASE_NAME = "_lease.json"
DEFAULT_TTL_S = 60.0
F = TypeVar("F", bound=Callable[..., Any])


class StageBusy(RuntimeError):
    """Another run holds the stage directory's lease."""


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or no pid recorded: assume alive
    return True


class Lease:
    def __init__(self, storage: Storage, stage_dir: str, stage: str,
                 ttl_s: float = DEFAULT_TTL_S) -> None:  # fmt: skip
        self.storage, self.stage, self.ttl_s = storage, stage, ttl_s
        self.uri = join(stage_dir, LEASE_NAME)
        self.owner = uuid.uuid4().hex
        self.pid = os.getpid()  # the holder (the driver), also in the heartbeat process's renewals
        self._heartbeat_process: Any = None
        self._stop: Any = None

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({
            "owner": self.owner, "stage": self.stage, "host": socket.gethostname(),
            "pid": self.pid, "heartbeat": now, "expires": now + self.ttl_s,
            "expires_utc": _when(now + self.ttl_s),
        }).encode()  # fmt: skip

    def _refuse(self, holder: dict[str, Any]) -> StageBusy:
        return StageBusy(
            f"{self.uri.rsplit('/', 1)[0]} is being written by another {holder.get('stage')} run "
            f"(host {holder.get('host')}, pid {holder.get('pid')}); its lease expires at "
            f"{holder.get('expires_utc')} unless renewed. Wait for it to finish, stop it, or "
            f"use another --run-dir. A holder that died is taken over once its lease expires."
        )

    # -- compare-and-swap, per backend --------------------------------------------------------

    def _swap_local(self, take: bool) -> None:
        import fcntl

        path = self.storage.fs(self.uri)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = os.open(os.path.dirname(path), os.O_RDONLY)  # flock on the folder itself
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._check(self._read_local(path), take)
            tmp = f"{path}.tmp-{self.owner}"
            with open(tmp, "wb") as f:
                f.write(self._record())
            os.replace(tmp, path)
        finally:
            os.close(lock)  # releases the flock

    @staticmethod
    def _read_local(path: str) -> dict[str, Any] | None:
        try:
            with open(path, "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _swap_object(self, take: bool) -> None:
        from fsspec.asyn import sync

        fs, path = self.storage.fs(self.uri)
        try:  # the holder and its ETag in one GET
            data, etag = sync(fs.loop, _get_with_etag, fs, path)
            holder = json.loads(data)
        except FileNotFoundError:
            holder, etag = None, None
        self._check(holder, take)
        condition = {"IfMatch": etag} if etag else {}
        try:
            fs.pipe_file(path, self._record(), mode="overwrite" if etag else "create",
                         **condition)  # fmt: skip
        except (FileExistsError, OSError) as e:  # 412: someone wrote between our read and PUT
            if "pre-condition" not in str(e) and not isinstance(e, FileExistsError):
                raise
            fs.invalidate_cache(path)
            raise self._refuse(json.loads(self.storage.read_bytes(self.uri))) from None

    def _check(self, holder: dict[str, Any] | None, take: bool) -> None:
        """Raise unless we may write: the lease is ours, absent, or expired (taking only)."""
        if holder is None or holder.get("owner") == self.owner:
            return
        if take and float(holder.get("expires", 0)) < time.time():
            print(f"{self.stage}: taking over the expired lease of host {holder.get('host')} "
                  f"pid {holder.get('pid')} (expired {holder.get('expires_utc')})", flush=True)  # fmt: skip
            return
        if take and holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
            # A killed job re-submitted at once (`ray job submit` runs drivers on the head
            # node): its holder is gone from this host, no need to wait for the expiry.
            print(f"{self.stage}: taking over the lease of pid {holder.get('pid')}, which is no "
                  f"longer running on this host", flush=True)  # fmt: skip
            return
        raise self._refuse(holder)

    def _swap(self, take: bool) -> None:
        (self._swap_local if is_local(self.uri) else self._swap_object)(take)

    # -- the lease's life ---------------------------------------------------------------------

    def acquire(self) -> None:
        self._swap(take=True)
        # A child process that renews until its stdin closes: on release, or when this process
        # dies however it dies (then the lease expires and is taken over).
        config = {"endpoint_url": self.storage.config.endpoint_url,
                  "region": self.storage.config.region}  # fmt: skip
        self._heartbeat_process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.core.lease", json.dumps(config), self.uri,
             self.stage, str(self.ttl_s), self.owner, str(self.pid)],
            stdin=subprocess.PIPE, start_new_session=False,
        )  # fmt: skip

    def release(self) -> None:
        if self._heartbeat_process is not None:
            self._heartbeat_process.stdin.close()  # the heartbeat stops at once
            self._heartbeat_process.wait()
        try:
            holder = json.loads(self.storage.read_bytes(self.uri))
        except FileNotFoundError:
            return
        if holder.get("owner") == self.owner:
            self.storage.remove_file(self.uri)


async def _get_with_etag(fs: Any, path: str) -> tuple[bytes, str]:
    """An object's bytes and its ETag, from one GET (s3fs's own calls need two: HEAD + GET)."""
    bucket, key = path.split("/", 1)
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    async with response["Body"] as body:
        return await body.read(), response["ETag"]


def _heartbeat(config: dict[str, Any], uri: str, stage: str, ttl_s: float, owner: str,
               pid: int) -> None:  # fmt: skip
    """The heartbeat process: renew the lease every ttl_s / 3 until stdin closes (released,
    or the holder died), or the holder's process is gone."""
    import select

    lease = Lease(Storage(StorageConfig(**config)), uri.rsplit("/", 1)[0], stage, ttl_s)
    lease.owner, lease.pid = owner, pid
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], ttl_s / 3)
        if readable and not sys.stdin.buffer.read1(1):  # EOF: stop
            return
        if not _alive(pid):
            return
        try:
            lease._swap(take=False)
        except StageBusy as e:
            print(f"{stage}: lost the stage lease: {e}", file=sys.stderr, flush=True)
            return
        except Exception as e:  # a storage hiccup: try again at the next beat
            print(f"{stage}: lease heartbeat failed ({type(e).__name__}); retrying",
                  file=sys.stderr, flush=True)  # fmt: skip


@contextmanager
def stage_lease(storage: Storage, stage_dir: str, stage: str, ttl_s: float = DEFAULT_TTL_S):
    lease = Lease(storage, stage_dir, stage, ttl_s)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()


def single_writer(stage: str, folder: Callable[[str, Any], str | None] | None = None
                  ) -> Callable[[F], F]:  # fmt: skip
    """Decorate a stage function `(..., run_dir, config, ...)`: it runs holding the lease of its
    stage folder (RUN/{FOLDERS[stage]}, or `folder(run_dir, config)` when a config can move
    it)."""
    from pipeline.core.stage_folder import StageFolder

    def decorate(run_stage: F) -> F:
        signature = inspect.signature(run_stage)

        @functools.wraps(run_stage)
        def run(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            run_dir, config = bound.arguments["run_dir"], bound.arguments["config"]
            uri = folder(run_dir, config) if folder is not None else None
            where = StageFolder(run_dir, stage, config.storage, uri)
            with stage_lease(where.storage, where.uri, stage):
                return run_stage(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate


if __name__ == "__main__":  # the heartbeat process of Lease.acquire
    _heartbeat(
        json.loads(sys.argv[1]),
        sys.argv[2],
        sys.argv[3],
        float(sys.argv[4]),
        sys.argv[5],
        int(sys.argv[6]),
    )
