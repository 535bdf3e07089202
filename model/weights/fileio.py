"""Whole-file reads and atomic writes for any fsspec URI. No torch: Ray workers that only
move files import this without paying for torch."""

from __future__ import annotations

import os
import uuid

import fsspec

TEMPORARY_MARK = ".tmp-"


def is_temporary(name: str) -> bool:
    """Whether a file name is one of write_bytes_atomic's temporaries (a writer killed between
    writing and renaming leaves one behind)."""
    return name.startswith(".") and TEMPORARY_MARK in name


def write_bytes_atomic(uri: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write a whole file so that no reader ever sees it half written.

    Local files go to a temporary name in the same folder and are renamed; object stores
    receive one complete upload, which only becomes visible once finished. storage_options
    are fsspec's (e.g. an S3 endpoint). The temporary name is hidden (`.name.tmp-<hex>`):
    a writer killed before its rename leaves it behind, and Arrow, Ray Data and DuckDB skip
    hidden files when they read a folder, so a folder of Parquet tables never shows a
    second copy of one (stages sweep such leftovers when they finish: remove_temporaries).
    """
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    parent, _, name = path.rpartition("/")
    if "file" in fs.protocol or "local" in fs.protocol:
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{name}{TEMPORARY_MARK}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    else:
        fs.pipe_file(path, data)


def remove_temporaries(folder: str) -> int:
    """Remove the temporaries killed writers left anywhere under a local folder; how many.
    Only for a folder nobody writes to now (a stage's output under its lease)."""
    removed = 0
    for root, _, names in os.walk(folder):
        for name in names:
            if is_temporary(name):
                os.remove(os.path.join(root, name))
                removed += 1
    return removed


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """A whole file in one request on object stores: a GET (opening a file object, or s3fs's
    concurrent download, first asks for its size with a HEAD). FileNotFoundError when there is
    none."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if hasattr(fs, "max_concurrency"):  # s3fs: one GET, not HEAD + ranged GETs
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)
