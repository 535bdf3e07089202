"""Whole-file reads and atomic writes for any fsspec URI. No torch: Ray workers that only
move files import this without paying for torch."""

from __future__ import annotations

import os
import uuid

import fsspec


def write_bytes_atomic(uri: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write a whole file so that no reader ever sees it half written.

    Local files go to a temporary name in the same folder and are renamed; object stores
    receive one complete upload, which only becomes visible once finished. storage_options
    are fsspec's (e.g. an S3 endpoint).
    """
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if "file" in fs.protocol or "local" in fs.protocol:
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        return f.read()
