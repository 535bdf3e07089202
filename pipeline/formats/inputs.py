"""What a run's input is, found cheaply before any stage starts.

`rqpipe run --input URI` takes a folder (or prefix) of images, whose class sub-folders are
labels; a CSV or Parquet listing with `path` and optional `label` and `caption` columns; or a
prefix of WebDataset tars, whose samples' `.json` may carry a label and a caption. Whether the
input has labels or captions decides what the RQ-Transformer can be conditioned on, and a run
that asks for more than the input has is refused before hours of sharding and training.

A handful of requests, whatever the input's size: the first LIST page of the top level, a
listing's header (CSV) or footer (Parquet), the first member of the first tar.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import tarfile
from dataclasses import dataclass

from pipeline.core.storage import Storage, is_local

LISTING_SUFFIXES = (".csv", ".parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class InputDescription:
    kind: str  # folder | listing | tars
    labels: bool  # class sub-folders, a label column, or labels in the tars' metadata
    captions: bool  # a caption column, or captions in the tars' metadata

    def __str__(self) -> str:
        has = [what for what, present in (("labels", self.labels), ("captions", self.captions))
               if present]  # fmt: skip
        return f"a {self.kind} with {' and '.join(has) if has else 'no labels or captions'}"


def describe_input(storage: Storage, uri: str) -> InputDescription:
    """The kind of input at `uri` and whether it has labels and captions; FileNotFoundError
    when there is nothing there."""
    if uri.endswith(LISTING_SUFFIXES):
        columns = _listing_columns(storage, uri)
        if "path" not in columns:
            raise ValueError(f"listing {uri} has no 'path' column (columns: {sorted(columns)}); "
                             "it needs path and optionally label and caption")  # fmt: skip
        return InputDescription("listing", "label" in columns, "caption" in columns)
    top = _first_page(storage, uri)
    if not top:
        raise FileNotFoundError(f"--input {uri}: nothing there (a folder of images, a CSV/Parquet "
                                f"listing or WebDataset tars)")  # fmt: skip
    files = sorted(entry["name"] for entry in top if entry.get("type") != "directory")
    folders = [entry for entry in top if entry.get("type") == "directory"]
    tars = [name for name in files if name.endswith(".tar")]
    images = [name for name in files if name.lower().endswith(IMAGE_SUFFIXES)]
    if tars and not images and not folders:  # WebDataset tars (their stats files beside them)
        meta = _first_tar_metadata(storage.fs(uri)[0], tars[0])
        return InputDescription("tars", meta.get("label") is not None,
                                bool(meta.get("caption")))  # fmt: skip
    return InputDescription("folder", bool(folders), False)


def _first_page(storage: Storage, uri: str, limit: int = 1000) -> list[dict]:
    """The first `limit` entries of a folder's top level ({"name", "type"}): one LIST request
    on an object store, whatever the prefix holds (a full listing of a flat prefix of 400M
    objects would take hours)."""
    fs, path = storage.fs(uri)
    if is_local(uri):
        if not os.path.isdir(path):
            return []
        with os.scandir(path) as entries:
            return [{"name": e.path, "type": "directory" if e.is_dir() else "file"}
                    for e in itertools.islice(entries, limit)]  # fmt: skip
    bucket, _, prefix = path.partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    try:
        page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/",
                          MaxKeys=limit)  # fmt: skip
    except FileNotFoundError:
        return []
    folders = [{"name": f"{bucket}/{p['Prefix'].rstrip('/')}", "type": "directory"}
               for p in page.get("CommonPrefixes", [])]  # fmt: skip
    files = [{"name": f"{bucket}/{o['Key']}", "type": "file"} for o in page.get("Contents", [])
             if not o["Key"].endswith("/")]  # fmt: skip
    return folders + files


def _listing_columns(storage: Storage, uri: str) -> list[str]:
    fs, path = storage.fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"--input {uri}: no such listing")
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as handle:  # the footer only
            return pq.ParquetFile(handle).schema_arrow.names
    with fs.open(path, "rb") as handle:
        head = handle.read(64 * 1024).decode("utf-8-sig", errors="replace")
    return next(csv.reader(io.StringIO(head)), [])


def _first_tar_metadata(fs, path: str) -> dict:
    """The `.json` metadata of the first sample of a tar, read from the tar's first members."""
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
        for member in itertools.islice(tar, 16):
            if member.isfile() and member.name.endswith(".json"):
                return json.loads(tar.extractfile(member).read())
    return {}
