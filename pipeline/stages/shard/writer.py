"""One output shard: its rows (a Ray Data group) to a WebDataset tar and its stats file.

Images are read concurrently, one GET each (`read_threads` at a time: a task waits on the
object store, not on the core), then decoded, resized and encoded in the rows' order (key
order; archive order for re-sharded tars), so the tar's bytes never depend on the timing. Every
row ends as a sample or a reject with its reason. The tar is written first, then
`{shard}.stats.json`, the shard's completion marker (a resume lists them).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from pipeline.core.storage import Storage, join
from pipeline.formats.images import Reject, decode_image, encode_image
from pipeline.formats.shard_tar import image_member, iter_tar, tar_bytes

STATS = pa.schema([("stats", pa.string())])


def _read(storage: Storage, uri: str, tars: dict[str, dict]) -> bytes:
    """An image's bytes: a file (one GET), or a member of an input tar (the tar read once)."""
    if "#" in uri and uri.split("#", 1)[0].endswith(".tar"):
        tar_uri, key = uri.split("#", 1)
        parts = tars[tar_uri].get(key, {})
        data = image_member(parts) if parts else None
        if data is None:
            raise Reject(f"sample has no image member (has {sorted(parts)})")
        return data
    return storage.read_bytes(uri)


def _fetch(storage: Storage, uris: list[str], tars: dict[str, dict], threads: int) -> list[Any]:
    """Each uri's bytes or the exception reading it raised, in order, `threads` at a time."""

    def one(uri: str) -> Any:
        try:
            return _read(storage, uri, tars)
        except (FileNotFoundError, Reject) as e:
            return e

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(one, uris))


def write_shard_group(group: pa.Table, config: Any, shards_dir: str, fp: str) -> pa.Table:
    """Ray Data map_groups: one shard's rows (unit, key, order, uri, label, caption) -> its tar
    and stats file; returns the stats as one JSON row."""
    storage = Storage(config.storage)
    # key order (archive order for tars); a duplicated path's rows in a fixed order too
    rows = sorted(group.to_pylist(), key=lambda r: (r["order"], r["key"], r["caption"] or "",
                                                    -1 if r["label"] is None else r["label"]))  # fmt: skip
    name = rows[0]["unit"]
    tar_uris = sorted({r["uri"].split("#", 1)[0] for r in rows if "#" in r["uri"]
                       and r["uri"].split("#", 1)[0].endswith(".tar")})  # fmt: skip
    tars = {uri: dict(iter_tar(storage.read_bytes(uri))) for uri in tar_uris}
    fetched = _fetch(storage, [r["uri"] for r in rows], tars, config.read_threads)
    files: list[tuple[str, bytes]] = []
    rejects: list[dict[str, str]] = []
    seen_keys: set[str] = set()
    captioned, max_label = 0, -1
    for row, data in zip(rows, fetched, strict=True):
        if row["key"] in seen_keys:  # a listing that names one file twice
            rejects.append({"source": row["uri"], "reason": "duplicate: the input lists this "
                                                            "path more than once"})  # fmt: skip
            continue
        seen_keys.add(row["key"])
        if isinstance(data, Exception):
            reason = str(data) if isinstance(data, Reject) else "file not found"
            rejects.append({"source": row["uri"], "reason": reason})
            continue
        try:
            decoded = decode_image(data, config.image_size, config.resize_mode, config.min_size,
                                   config.max_pixels)  # fmt: skip
        except Reject as reason:
            rejects.append({"source": row["uri"], "reason": str(reason)})
            continue
        meta = {"source": row["uri"], "width": decoded.original_size[0],
                "height": decoded.original_size[1], "label": row["label"],
                "caption": row["caption"]}  # fmt: skip
        files.append((f"{row['key']}.{config.encoding}",
                      encode_image(decoded.image, config.encoding, config.quality)))  # fmt: skip
        files.append((f"{row['key']}.json", json.dumps(meta, sort_keys=True).encode()))
        captioned += bool(row["caption"])
        if row["label"] is not None:
            max_label = max(max_label, row["label"])
    tar = tar_bytes(files)
    storage.write_bytes(join(shards_dir, f"{name}.tar"), tar)
    stats = {"fingerprint": fp, "shard": name, "seen": len(rows), "ok": len(files) // 2,
             "bytes": len(tar), "rejects": rejects, "captioned": captioned,
             "max_label": max_label}  # fmt: skip
    text = json.dumps(stats, sort_keys=True)
    storage.write_bytes(join(shards_dir, f"{name}.stats.json"), text.encode())
    return pa.table({"stats": [text]}, schema=STATS)
