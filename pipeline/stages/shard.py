"""The shard stage: image files (or a listing, or existing tars) -> WebDataset tar shards.

Output under RUN/shards/:
  {split}-{NNNNNN}.tar         samples {key}.{png|jpg|webp} + {key}.json (source, size, label, caption)
  {split}-{NNNNNN}.stats.json  written after its tar: the shard's completion marker and its rejects
  rejects.parquet              (source, reason) for every input that did not become a sample
  labels.json                  class name -> label index, when the input has classes
  _manifest.json               last: every shard with its sample count and size; the counts

Planning is deterministic (keys hashed from each input's path relative to the input root, the
split decided by the key's hash, shards filled in key order), so the same input always gives
the same shards, byte for byte: tar members carry fixed owners and mtimes. Filling shards in
hash order, not path order, mixes them: a class-sorted input (ImageNet's class folders) gives
shards that each hold every class in proportion, which streaming training needs. Re-sharded
WebDataset tars keep their archive order instead: in hash order every output shard would read
every input tar; tars are normally mixed already.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.core.config import output_fields
from pipeline.core.lease import single_writer
from pipeline.core.manifest import Manifest
from pipeline.core.progress import Progress
from pipeline.core.stage_folder import StageFolder
from pipeline.core.storage import Storage, StorageConfig, absolute, join
from pipeline.formats.images import ENCODINGS, RESIZE_MODES, Reject, decode_image, encode_image
from pipeline.formats.shard_tar import iter_tar, tar_bytes

FORMAT_VERSION = 2  # 2: shards filled in key (hash) order, not path order
LISTING_SUFFIXES = (".csv", ".parquet")


@dataclass
class ShardConfig:
    section: ClassVar[str] = "shard"
    # Execution knobs: they change how fast, never what is written (not fingerprinted).
    execution_fields: ClassVar[tuple[str, ...]] = ("cpus_per_task", "max_retries",
                                                   "max_in_flight", "storage")  # fmt: skip

    image_size: int = 256
    # center_crop: the centre square at image_size; shorter_side: the shorter side at image_size,
    # the aspect kept up to 2:1 (random crops then move along the longer side: ImageNet's
    # Resize + RandomCrop); pad; none
    resize_mode: str = "center_crop"
    encoding: str = "png"  # png | jpg | webp
    quality: int = 95  # jpg / webp
    samples_per_shard: int = 1000
    val_fraction: float = 0.05
    min_size: int = 0  # reject images whose shorter side is smaller
    max_pixels: int = 100_000_000  # reject larger images (decompression bombs) unread
    cpus_per_task: float = 1.0
    max_retries: int = 3
    max_in_flight: int = 64
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={self.resize_mode!r}: use one of {RESIZE_MODES}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding={self.encoding!r}: use one of {sorted(ENCODINGS)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("image_size", "samples_per_shard", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Source:
    key: str
    uri: str  # a file, or "{tar uri}#{member key}" for re-sharding
    relative: str  # identity within the input; the key is its hash
    size: int
    label: int | None = None
    caption: str | None = None

    @property
    def in_tar(self) -> bool:
        """A member of an input tar (re-sharding), rather than a file of its own."""
        return "#" in self.uri and self.uri.split("#", 1)[0].endswith(".tar")


@dataclass
class ShardUnit:
    name: str  # {split}-{NNNNNN}
    sources: list[Source]


# -- planning -----------------------------------------------------------------------------------


def _key(relative: str) -> str:
    return hashlib.sha1(relative.encode()).hexdigest()[:20]


def _relative(root: str, uri: str) -> str:
    root = root.rstrip("/")
    return uri[len(root) + 1 :] if uri.startswith(root + "/") else uri.rsplit("/", 1)[-1]


def _label_map(names: list[str | None]) -> dict[str, int]:
    return {name: i for i, name in enumerate(sorted({n for n in names if n is not None}))}


def _from_folder(root: str, files: list[tuple[str, int]]) -> tuple[list[Source], dict[str, int]]:
    rels = [_relative(root, uri) for uri, _ in files]
    classes = [rel.split("/", 1)[0] if "/" in rel else None for rel in rels]
    labels = _label_map(classes)
    sources = [
        Source(_key(rel), uri, rel, size, labels.get(cls) if cls else None)
        for (uri, size), rel, cls in zip(files, rels, classes, strict=True)
    ]
    return sources, labels


def _read_listing(storage: Storage, uri: str) -> list[dict[str, Any]]:
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))


def _from_listing(storage: Storage, uri: str) -> tuple[list[Source], dict[str, int]]:
    rows = _read_listing(storage, uri)
    if rows and "path" not in rows[0]:
        raise ValueError(f"listing {uri} has no 'path' column (columns: {sorted(rows[0])}); "
                         "it needs path and optionally label and caption")  # fmt: skip
    base = uri.rsplit("/", 1)[0]
    raw_labels = [row.get("label") for row in rows]
    numeric = all(lab is None or str(lab).lstrip("-").isdigit() for lab in raw_labels)
    labels = {} if numeric else _label_map([None if v in (None, "") else str(v)
                                            for v in raw_labels])  # fmt: skip
    sources = []
    for row, raw in zip(rows, raw_labels, strict=True):
        path = str(row["path"])
        full = path if "://" in path or path.startswith("/") else join(base, path)
        label = (int(raw) if numeric else labels[str(raw)]) if raw not in (None, "") else None
        caption = row.get("caption") or None
        sources.append(Source(_key(path), full, path, 0, label, caption))
    return sources, labels


def _from_tars(storage: Storage, root: str, tars: list[tuple[str, int]]) -> list[Source]:
    sources = []
    for uri, _ in tars:
        rel_tar = _relative(root, uri)
        for key, parts in iter_tar(storage.read_bytes(uri)):
            meta = json.loads(parts["json"]) if "json" in parts else {}
            rel = f"{rel_tar}#{key}"
            size = sum(len(v) for v in parts.values())
            sources.append(Source(_key(rel), f"{uri}#{key}", rel, size, meta.get("label"),
                                  meta.get("caption")))  # fmt: skip
    return sources


def plan_sources(storage: Storage, input_uri: str) -> tuple[list[Source], dict[str, int]]:
    """Every input, sorted by its relative path, and the class map (empty without classes)."""
    if input_uri.endswith(LISTING_SUFFIXES):
        sources, labels = _from_listing(storage, input_uri)
    else:
        files = storage.list_files(input_uri)
        if not files:
            raise FileNotFoundError(f"no files under {input_uri}: check the path and storage")
        if all(uri.endswith(".tar") for uri, _ in files):
            sources, labels = _from_tars(storage, input_uri, files), {}
        else:
            sources, labels = _from_folder(input_uri, files)
    return sorted(sources, key=lambda s: s.relative), labels


def split_of(key: str, val_fraction: float) -> str:
    return "val" if int(key[:8], 16) / 16**8 < val_fraction else "train"


def plan_units(sources: list[Source], config: ShardConfig) -> list[ShardUnit]:
    by_split: dict[str, list[Source]] = {"train": [], "val": []}
    # Files: hash order mixes the shards. Tar members: archive order reads each input tar once.
    order = (lambda s: s.relative) if sources and sources[0].in_tar else (lambda s: s.key)
    for source in sorted(sources, key=order):
        by_split[split_of(source.key, config.val_fraction)].append(source)
    units = []
    for split, members in by_split.items():
        n = config.samples_per_shard
        for i in range(0, len(members), n):
            units.append(ShardUnit(f"{split}-{i // n:06d}", members[i : i + n]))
    return units


def listing_digest(sources: list[Source]) -> str:
    h = hashlib.sha256()
    for s in sources:
        h.update(f"{s.relative}\0{s.size}\0{s.label}\0{s.caption}\n".encode())
    return h.hexdigest()[:32]


# -- one shard ----------------------------------------------------------------------------------


def _read_source(storage: Storage, source: Source, tar_cache: dict[str, dict]) -> bytes:
    if source.in_tar:
        tar_uri, key = source.uri.split("#", 1)
        if tar_uri not in tar_cache:
            tar_cache.clear()  # sources are sorted: one input tar at a time
            tar_cache[tar_uri] = dict(iter_tar(storage.read_bytes(tar_uri)))
        parts = tar_cache[tar_uri][key]
        for ext in ("png", "jpg", "jpeg", "webp"):
            if ext in parts:
                return parts[ext]
        raise Reject(f"sample has no image member (has {sorted(parts)})")
    return storage.read_bytes(source.uri)


def write_shard(unit: ShardUnit, config: ShardConfig, shards_dir: str, fp: str) -> dict[str, Any]:
    """Decode, resize and encode every source of `unit`; write the tar, then its stats."""
    storage = Storage(config.storage)
    files: list[tuple[str, bytes]] = []
    rejects: list[dict[str, str]] = []
    tar_cache: dict[str, dict] = {}
    for source in unit.sources:
        try:
            decoded = decode_image(_read_source(storage, source, tar_cache), config.image_size,
                                   config.resize_mode, config.min_size,
                                   config.max_pixels)  # fmt: skip
        except Reject as reason:
            rejects.append({"source": source.uri, "reason": str(reason)})
            continue
        except FileNotFoundError:
            rejects.append({"source": source.uri, "reason": "file not found"})
            continue
        meta = {"source": source.uri, "width": decoded.original_size[0],
                "height": decoded.original_size[1], "label": source.label,
                "caption": source.caption}  # fmt: skip
        files.append((f"{source.key}.{config.encoding}",
                      encode_image(decoded.image, config.encoding, config.quality)))  # fmt: skip
        files.append((f"{source.key}.json", json.dumps(meta, sort_keys=True).encode()))
    tar = tar_bytes(files)
    storage.write_bytes(join(shards_dir, f"{unit.name}.tar"), tar)
    rejected = {r["source"] for r in rejects}
    kept = [s for s in unit.sources if s.uri not in rejected]
    stats = {"fingerprint": fp, "shard": unit.name, "seen": len(unit.sources),
             "ok": len(files) // 2, "bytes": len(tar), "rejects": rejects,
             "captioned": sum(1 for s in kept if s.caption),
             "max_label": max((s.label for s in kept if s.label is not None), default=-1)}  # fmt: skip
    storage.write_bytes(join(shards_dir, f"{unit.name}.stats.json"),
                        json.dumps(stats, sort_keys=True).encode())  # fmt: skip
    return stats


# -- the stage ----------------------------------------------------------------------------------


def _completed(storage: Storage, shards_dir: str, fp: str) -> dict[str, dict]:
    """Stats of the shards already finished under this fingerprint, by shard name."""
    done = {}
    for uri, _ in storage.list_files(shards_dir):
        if uri.endswith(".stats.json"):
            stats = json.loads(storage.read_bytes(uri))
            if stats.get("fingerprint") == fp:
                done[stats["shard"]] = stats
    return done


def _write_rejects(storage: Storage, uri: str, rejects: list[dict[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"source": [r["source"] for r in rejects],
                      "reason": [r["reason"] for r in rejects]},
                     schema=pa.schema([("source", pa.string()), ("reason", pa.string())]))  # fmt: skip
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(uri, buffer.getvalue())


@single_writer("shard")
def run_shard_stage(
    input_uri: str, run_dir: str, config: ShardConfig, overwrite: bool = False
) -> Manifest:
    """Shard `input_uri` into RUN/shards/ with Ray tasks; idempotent and resumable."""
    import ray

    started = time.time()
    input_uri = absolute(input_uri)  # in the driver: a Ray worker has a working dir of its own
    shards = StageFolder(run_dir, "shard", config.storage)
    storage, shards_dir = shards.storage, shards.uri
    sources, labels = plan_sources(storage, input_uri)
    planned = Manifest(
        stage="shard",
        format_version=FORMAT_VERSION,
        config={
            **output_fields(config),
            "input": input_uri,
            "input_digest": listing_digest(sources),
        },
        upstream={},
    )
    if (finished := shards.begin(planned, overwrite)) is not None:
        return finished

    fp = planned.fingerprint
    units = plan_units(sources, config)
    storage.remove_temporaries(shards_dir)  # left by writers killed mid-write
    results = _completed(storage, shards_dir, fp)
    pending = [u for u in units if u.name not in results]
    print(f"shard: {len(sources):,} inputs -> {len(units)} shards "
          f"({len(results)} already done, {len(pending)} to write) in {shards_dir}")  # fmt: skip

    task = ray.remote(write_shard).options(
        num_cpus=config.cpus_per_task, max_retries=config.max_retries, retry_exceptions=True
    )
    progress = Progress("shard", len(pending), sum(len(u.sources) for u in pending), "inputs")
    rejected = 0
    in_flight: list = []
    queue = list(pending)
    while queue or in_flight:
        while queue and len(in_flight) < config.max_in_flight:
            in_flight.append(task.remote(queue.pop(0), config, shards_dir, fp))
        ready, in_flight = ray.wait(in_flight, num_returns=1)
        stats = ray.get(ready[0])
        results[stats["shard"]] = stats
        rejected += len(stats["rejects"])
        progress.update(stats["seen"], f", {rejected:,} rejected")

    ordered = [results[u.name] for u in units]
    rejects = [r for s in ordered for r in s["rejects"]]
    counts = {"seen": sum(s["seen"] for s in ordered), "ok": sum(s["ok"] for s in ordered),
              "rejected": len(rejects), "shards": len(units)}  # fmt: skip
    if counts["ok"] + counts["rejected"] != counts["seen"] or counts["seen"] != len(sources):
        raise RuntimeError(f"shard: counts do not reconcile: {counts}, inputs {len(sources)}")
    _write_rejects(storage, join(shards_dir, "rejects.parquet"), rejects)
    if labels:
        storage.write_bytes(join(shards_dir, "labels.json"),
                            json.dumps(labels, indent=2, sort_keys=True).encode())  # fmt: skip
    planned.units = [{"name": f"{s['shard']}.tar", "rows": s["ok"], "bytes": s["bytes"],
                      "captioned": s["captioned"], "max_label": s["max_label"]}
                     for s in ordered]  # fmt: skip
    planned.counts = counts
    shards.finish(planned)
    print(f"shard: {counts['ok']:,} ok + {counts['rejected']:,} rejected = {counts['seen']:,} "
          f"seen, {len(units)} shards, {time.time() - started:.1f} s")  # fmt: skip
    return planned
