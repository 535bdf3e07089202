"""What a run's input is, found cheaply before any stage starts.

`rqpipe run --input URI` takes a folder (or prefix) of images, whose class sub-folders are
labels; a CSV or Parquet listing with `path` and optional `label` and `caption` columns; or a
prefix of WebDataset tars, whose samples' `.json` may carry a label and a caption. Whether the
input has labels or captions decides what the RQ-Transformer can be conditioned on, and a run
that asks for more than the input has is refused before hours of sharding and training.

A handful of requests, whatever the input's size: one LIST page of the top level, a listing's
header (CSV) or footer (Parquet), the first member of the first tar.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import tarfile
from dataclasses import dataclass

from pipeline.core.storage import Storage

LISTING_SUFFIXES = (".csv", ".parquet")


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
    fs, path = storage.fs(uri)
    try:
        top = fs.ls(path, detail=True)
    except FileNotFoundError:
        top = []
    if not top:
        raise FileNotFoundError(f"--input {uri}: nothing there (a folder of images, a CSV/Parquet "
                                f"listing or WebDataset tars)")  # fmt: skip
    files = sorted(entry["name"] for entry in top if entry.get("type") != "directory")
    folders = [entry for entry in top if entry.get("type") == "directory"]
    tars = [name for name in files if name.endswith(".tar")]
    if tars and len(tars) == len(files) and not folders:
        meta = _first_tar_metadata(fs, tars[0])
        return InputDescription("tars", meta.get("label") is not None,
                                bool(meta.get("caption")))  # fmt: skip
    return InputDescription("folder", bool(folders), False)


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
