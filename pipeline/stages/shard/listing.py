"""The shard stage's planning, streamed: the input's rows as a Ray Dataset (never a list in the
driver), a census of them, and each row's output shard.

Rows (`ROWS`): `relative` (the input's identity: its path relative to the input root, or
`{tar}#{member}`), `uri` (what a worker reads: a file, or `{tar uri}#{member}`), `size`,
`label_name` (a class folder or a string label) or `label` (an integer one), `caption`, and
for re-sharded tars `tar`, `member` (the archive position) and `rank` (the position among
the tar's members of the same split).

- a CSV or Parquet listing is read by Ray Data in blocks;
- a folder is listed by Ray tasks, one per sub-folder (ImageNet's 1,000 class folders list in
  parallel) and one for the files at its top, each returning an Arrow table;
- a prefix of WebDataset tars: one task a tar reads its members' metadata.

A row's key is the hash of `relative`; its split the key's first 32 bits; its shard, for files,
the key's next 32 bits modulo the split's number of shards (hash buckets: each shard mixes every
class of a class-sorted input, and no global sort is ever needed), for tar members its archive
position divided by `samples_per_shard` (an output shard then reads one or two input tars).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.storage import Storage, StorageConfig, join
from pipeline.formats.inputs import IMAGE_SUFFIXES, LISTING_SUFFIXES, describe_input
from pipeline.formats.shard_tar import iter_tar

ROWS = pa.schema([("relative", pa.string()), ("uri", pa.string()), ("size", pa.int64()),
                  ("label_name", pa.string()), ("label", pa.int64()), ("caption", pa.string()),
                  ("tar", pa.int64()), ("member", pa.int64()), ("rank", pa.int64())])  # fmt: skip


def _table(columns: dict[str, list]) -> pa.Table:
    n = len(columns["relative"])
    full = {name: columns.get(name, [None] * n) for name in ROWS.names}
    return pa.table(full, schema=ROWS)


def _relative(root: str, uri: str) -> str:
    root = root.rstrip("/")
    return uri[len(root) + 1 :] if uri.startswith(root + "/") else uri.rsplit("/", 1)[-1]


def _list_top(storage_config: StorageConfig, root: str) -> tuple[list[str], pa.Table]:
    """Ray task (two returns): the sub-folders of `root`, and the files directly in it as rows.
    The files stay in the object store: a flat prefix of millions never reaches the driver."""
    storage = Storage(storage_config)
    fs, path = storage.fs(root)
    try:
        top = sorted(fs.ls(path, detail=True), key=lambda i: i["name"])
    except FileNotFoundError:
        top = []
    folders = [storage.uri_of(root, i["name"]) for i in top if i.get("type") == "directory"]
    files = [(storage.uri_of(root, i["name"]), int(i.get("size") or 0))
             for i in top if i.get("type", "file") == "file"]  # fmt: skip
    return folders, _file_rows(root, files)


def _list_folder(storage_config: StorageConfig, root: str, folder: str) -> pa.Table:
    """Ray task: every file under `folder` (paginated, recursive) as rows; the folder is the
    class of its files."""
    storage = Storage(storage_config)
    fs, path = storage.fs(folder)
    found = fs.find(path, detail=True)
    files = [(storage.uri_of(folder, p), int(i.get("size") or 0))
             for p, i in sorted(found.items()) if i.get("type", "file") == "file"]  # fmt: skip
    return _file_rows(root, files)


def _file_rows(root: str, files: list[tuple[str, int]]) -> pa.Table:
    relatives = [_relative(root, uri) for uri, _ in files]
    return _table({"relative": relatives, "uri": [uri for uri, _ in files],
                   "size": [size for _, size in files],
                   "label_name": [r.split("/", 1)[0] if "/" in r else None for r in relatives]})  # fmt: skip


def _tar_members(storage_config: StorageConfig, root: str, tar_uri: str, index: int,
                 val_fraction: float) -> pa.Table:  # fmt: skip
    """Ray task: one input tar's samples as rows, in archive order (read here, in a task, not
    through the driver), each with its rank among the tar's members of its split."""
    storage = Storage(storage_config)
    rel_tar = _relative(root, tar_uri)
    columns: dict[str, list] = {k: [] for k in ("relative", "uri", "size", "label", "caption",
                                                "member", "rank")}  # fmt: skip
    ranks = {"train": 0, "val": 0}
    for position, (key, parts) in enumerate(iter_tar(storage.read_bytes(tar_uri))):
        meta = json.loads(parts["json"]) if "json" in parts else {}
        relative = f"{rel_tar}#{key}"
        split = split_of(row_keys([relative])[0], val_fraction)
        columns["relative"].append(relative)
        columns["uri"].append(f"{tar_uri}#{key}")
        columns["size"].append(sum(len(v) for v in parts.values()))
        columns["label"].append(meta.get("label"))
        columns["caption"].append(meta.get("caption"))
        columns["member"].append(position)
        columns["rank"].append(ranks[split])
        ranks[split] += 1
    columns["tar"] = [index] * len(columns["relative"])
    return _table(columns)


def _row_groups(batch: pa.Table, storage_config: StorageConfig, uri: str) -> pa.Table:
    """Ray Data map: row-group indices of a Parquet listing -> those row groups' rows."""
    filesystem, path = Storage(storage_config).arrow_fs(uri)
    listing = pq.ParquetFile(path, filesystem=filesystem)
    return listing.read_row_groups(batch.column("id").to_pylist())


def _listing_rows(batch: pa.Table, base: str) -> pa.Table:
    """Ray Data map: a listing's rows (path, [label], [caption]) -> ROWS."""
    if "path" not in batch.column_names:
        raise ValueError(f"the listing has no 'path' column (columns: {batch.column_names}); it "
                         f"needs path and optionally label and caption")  # fmt: skip
    paths = [str(p) for p in batch.column("path").to_pylist()]
    uris = [p if "://" in p or p.startswith("/") else join(base, p) for p in paths]
    columns: dict[str, list] = {"relative": paths, "uri": uris, "size": [0] * len(paths)}
    if "caption" in batch.column_names:
        columns["caption"] = [c or None for c in batch.column("caption").to_pylist()]
    if "label" in batch.column_names:
        raw = batch.column("label").to_pylist()
        numeric = all(v is None or str(v).lstrip("-").isdigit() for v in raw)
        if numeric:
            columns["label"] = [None if v in (None, "") else int(v) for v in raw]
        else:
            columns["label_name"] = [None if v in (None, "") else str(v) for v in raw]
    return _table(columns)


CSV_BLOCK_BYTES = 16 << 20  # a block of a CSV listing: ~150,000 rows


def input_rows(storage: Storage, input_uri: str, val_fraction: float, cpus: float
               ) -> tuple[Any, str]:  # fmt: skip
    """(the input's rows as a Ray Dataset, its kind: listing | folder | tars)."""
    import ray
    import ray.data

    if input_uri.endswith(LISTING_SUFFIXES):
        describe_input(storage, input_uri)  # its header: no 'path' column is refused here
        base = input_uri.rsplit("/", 1)[0]
        if input_uri.endswith(".parquet"):
            # Ray Data 2.58's read_parquet drops a column named `path`: the row groups are read
            # by our own map, a few at a time, streamed.
            filesystem, path = storage.arrow_fs(input_uri)
            groups = pq.ParquetFile(path, filesystem=filesystem).num_row_groups
            rows = ray.data.range(groups).map_batches(
                _row_groups, batch_format="pyarrow", batch_size=1, num_cpus=cpus,
                fn_kwargs={"storage_config": storage.config, "uri": input_uri})  # fmt: skip
        else:
            # Ray Data splits a lone file's rows into 2 blocks a cluster CPU: on a small
            # listing that is a task (and a worker to start) a few rows. One block a
            # CSV_BLOCK_BYTES instead.
            filesystem, path = storage.arrow_fs(input_uri)
            blocks = max(1, -(-filesystem.get_file_info(path).size // CSV_BLOCK_BYTES))
            rows = ray.data.read_csv(path, filesystem=filesystem, override_num_blocks=blocks)
        return rows.map_batches(_listing_rows, batch_format="pyarrow", fn_kwargs={"base": base},
                                num_cpus=cpus), "listing"  # fmt: skip
    folders_ref, top_ref = ray.remote(_list_top).options(num_cpus=cpus, num_returns=2).remote(
        storage.config, input_uri)  # fmt: skip
    folders = ray.get(folders_ref)
    if not folders:  # only files at the top: images, or tars to re-shard
        uris = ray.get(top_ref).column("uri").to_pylist()
        if not uris:
            raise FileNotFoundError(f"no files under {input_uri}: check the path and storage")
        tars = [u for u in uris if u.endswith(".tar")]
        if tars and not any(u.lower().endswith(IMAGE_SUFFIXES) for u in uris):
            # WebDataset tars (with, say, an rqpipe shard folder's stats files beside them)
            task = ray.remote(_tar_members).options(num_cpus=cpus)
            refs = [task.remote(storage.config, input_uri, uri, i, val_fraction)
                    for i, uri in enumerate(tars)]  # fmt: skip
            return ray.data.from_arrow_refs(refs), "tars"
    task = ray.remote(_list_folder).options(num_cpus=cpus)
    refs = [top_ref, *(task.remote(storage.config, input_uri, folder) for folder in folders)]
    return ray.data.from_arrow_refs(refs), "folder"


# -- keys, the census, units ----------------------------------------------------------------------


def row_keys(relatives: list[str]) -> list[str]:
    return [hashlib.sha1(r.encode()).hexdigest()[:20] for r in relatives]


def split_of(key: str, val_fraction: float) -> str:
    return "val" if int(key[:8], 16) / 16**8 < val_fraction else "train"


def _census_part(batch: pa.Table, val_fraction: float) -> pa.Table:
    """Ray Data map: a batch's counts per split (and per tar), its label names, and the two
    halves of the sum of its rows' digests (a multiset hash: the same rows in any order give
    the same digest)."""
    relatives = batch.column("relative").to_pylist()
    keys = row_keys(relatives)
    splits = [split_of(k, val_fraction) for k in keys]
    content = zip(relatives, batch.column("size").to_pylist(), batch.column("label").to_pylist(),
                  batch.column("label_name").to_pylist(), batch.column("caption").to_pylist(),
                  strict=True)  # fmt: skip
    digests = [hashlib.sha256(json.dumps(row).encode()).digest() for row in content]
    high = sum(int.from_bytes(d[:8], "little") for d in digests) % 2**64
    low = sum(int.from_bytes(d[8:16], "little") for d in digests) % 2**64
    tars = batch.column("tar").to_pylist()
    per_tar: dict[str, int] = {}
    for tar, split in zip(tars, splits, strict=True):
        if tar is not None:
            per_tar[f"{tar}:{split}"] = per_tar.get(f"{tar}:{split}", 0) + 1
    names = sorted({n for n in batch.column("label_name").to_pylist() if n is not None})
    return pa.table({"train": [splits.count("train")], "val": [splits.count("val")],
                     "high": [str(high)], "low": [str(low)], "labels": [json.dumps(names)],
                     "tars": [json.dumps(per_tar)]})  # fmt: skip


@dataclass
class Census:
    """What the planning knows of the input after one streamed pass: counts, classes, a digest,
    and for tars each tar's count per split. O(shards + classes + tars), never O(images)."""

    kind: str
    counts: dict[str, int]  # split -> rows
    label_names: list[str]
    digest: str
    per_tar: dict[str, int] = field(default_factory=dict)  # "tar:split" -> rows

    @property
    def seen(self) -> int:
        return sum(self.counts.values())

    def shards(self, split: str, samples_per_shard: int) -> int:
        return math.ceil(self.counts.get(split, 0) / samples_per_shard)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "counts": self.counts, "label_names": self.label_names,
                "digest": self.digest, "per_tar": self.per_tar}  # fmt: skip


def take_census(rows: Any, kind: str, val_fraction: float, cpus: float) -> Census:
    parts = rows.map_batches(_census_part, batch_format="pyarrow", num_cpus=cpus,
                             fn_kwargs={"val_fraction": val_fraction})  # fmt: skip
    counts, labels, high, low, per_tar = {"train": 0, "val": 0}, set(), 0, 0, {}
    for part in parts.iter_rows():
        counts["train"] += part["train"]
        counts["val"] += part["val"]
        high, low = (high + int(part["high"])) % 2**64, (low + int(part["low"])) % 2**64
        labels.update(json.loads(part["labels"]))
        for name, n in json.loads(part["tars"]).items():
            per_tar[name] = per_tar.get(name, 0) + n
    digest = hashlib.sha256(f"{high}:{low}:{counts}".encode()).hexdigest()[:32]
    return Census(kind, counts, sorted(labels), digest, per_tar)


def assign_units(batch: pa.Table, census: dict[str, Any], val_fraction: float,
                 samples_per_shard: int) -> pa.Table:  # fmt: skip
    """Ray Data map: each row's key, split, output shard (`unit`) and label index."""
    keys = row_keys(batch.column("relative").to_pylist())
    splits = [split_of(k, val_fraction) for k in keys]
    if census["kind"] == "tars":  # archive order: the split's running position, tar by tar
        offsets = _tar_offsets(census["per_tar"])
        ranks = batch.column("rank").to_pylist()
        positions = [offsets[f"{t}:{s}"] + r for t, s, r in
                     zip(batch.column("tar").to_pylist(), splits, ranks, strict=True)]  # fmt: skip
        units = [
            f"{s}-{p // samples_per_shard:06d}" for s, p in zip(splits, positions, strict=True)
        ]
        order = positions
    else:  # hash buckets
        buckets = {s: max(1, math.ceil(census["counts"][s] / samples_per_shard))
                   for s in ("train", "val")}  # fmt: skip
        units = [
            f"{s}-{int(k[8:16], 16) % buckets[s]:06d}" for s, k in zip(splits, keys, strict=True)
        ]
        order = [0] * len(keys)
    index = {name: i for i, name in enumerate(census["label_names"])}
    labels = [index[n] if n is not None else v for n, v in
              zip(batch.column("label_name").to_pylist(), batch.column("label").to_pylist(),
                  strict=True)]  # fmt: skip
    return pa.table({"unit": units, "key": keys, "order": pa.array(order, pa.int64()),
                     "uri": batch.column("uri"), "label": pa.array(labels, pa.int64()),
                     "caption": batch.column("caption")})  # fmt: skip


def _tar_offsets(per_tar: dict[str, int]) -> dict[str, int]:
    """ "tar:split" -> the split's position of that tar's first row (tars in input order)."""
    offsets, running = {}, {"train": 0, "val": 0}
    for tar in sorted({int(name.split(":")[0]) for name in per_tar}):
        for split in ("train", "val"):
            offsets[f"{tar}:{split}"] = running[split]
            running[split] += per_tar.get(f"{tar}:{split}", 0)
    return offsets
