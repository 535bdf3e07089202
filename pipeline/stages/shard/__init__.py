"""The shard stage: image files (or a listing, or existing tars) -> WebDataset tar shards.

Output under RUN/shards/:
  {split}-{NNNNNN}.tar         samples {key}.{png|jpg|webp} + {key}.json (source, size, label, caption)
  {split}-{NNNNNN}.stats.json  written after its tar: the shard's completion marker and its rejects
  rejects.parquet              (source, reason) for every input that did not become a sample,
                               in shard order (assembled from a local spill: rejects.py)
  labels.json                  class name -> label index, when the input has classes
  _plan.json                   the census of the input a run started from (counts, digest)
  _manifest.json               last: every shard with its sample count and size; the counts

The driver never holds the input: Ray Data streams it (listing.py), takes one census of it
(counts per split, classes, a digest of the rows), and groups the rows by output shard (hash
buckets of their keys; archive order for re-sharded tars), and each group is written by a Ray
Data task (writer.py). The same input always gives the same shards, byte for byte. A finished
stage re-run reads its manifest and stops: the input is identified by its URI and, for a
listing file, its ETag (or size and mtime), not re-listed (`rescan_input: true` re-lists a
folder and refuses a changed one). A resumed run lists the stage folder once for the finished
shards and checks the input against the census it started from.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.core.config import output_fields
from pipeline.core.lease import single_writer
from pipeline.core.manifest import Manifest, StageConflict
from pipeline.core.progress import Progress
from pipeline.core.stage_folder import StageFolder
from pipeline.core.storage import Storage, StorageConfig, absolute, is_local
from pipeline.formats.images import ENCODINGS, RESIZE_MODES
from pipeline.formats.inputs import LISTING_SUFFIXES
from pipeline.stages.shard.listing import Census, assign_units, input_rows, take_census
from pipeline.stages.shard.rejects import RejectsSpill
from pipeline.stages.shard.writer import write_shard_group

FORMAT_VERSION = 3  # 3: shards are hash buckets of the keys, not runs of the sorted keys
PLAN_NAME = "_plan.json"


@dataclass
class ShardConfig:
    section: ClassVar[str] = "shard"
    # Execution knobs: they change how fast, never what is written (not fingerprinted).
    execution_fields: ClassVar[tuple[str, ...]] = ("cpus_per_task", "max_retries",
                                                   "read_threads", "rescan_input", "storage")  # fmt: skip

    image_size: int = 256
    # center_crop: the centre square at image_size; shorter_side: the shorter side at image_size,
    # the aspect kept up to 2:1 (random crops then move along the longer side: ImageNet's
    # Resize + RandomCrop); pad; none
    resize_mode: str = "center_crop"
    encoding: str = "png"  # png | jpg | webp
    quality: int = 95  # jpg / webp
    samples_per_shard: int = 1000  # on average: a shard is a hash bucket of the keys
    val_fraction: float = 0.05
    min_size: int = 0  # reject images whose shorter side is smaller
    max_pixels: int = 100_000_000  # reject larger images (decompression bombs) unread
    cpus_per_task: float = 1.0
    max_retries: int = 3
    read_threads: int = 16  # concurrent image reads inside a shard task (one GET each)
    # A finished stage is not re-listed (400M images: hours of LIST requests); true: re-list a
    # folder input and refuse it if it changed since it was sharded.
    rescan_input: bool = False
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={self.resize_mode!r}: use one of {RESIZE_MODES}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding={self.encoding!r}: use one of {sorted(ENCODINGS)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("image_size", "samples_per_shard", "read_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def input_version(storage: Storage, input_uri: str) -> str:
    """What identifies the input without listing it: a listing file's ETag on an object store
    (one HEAD), its content's hash on local disk; a folder or prefix is what it was when first
    sharded (its census digest is in the manifest; `rescan_input` checks it)."""
    if not input_uri.endswith(LISTING_SUFFIXES):
        return "as listed"
    fs, path = storage.fs(input_uri)
    try:
        if is_local(input_uri):
            with open(path, "rb") as handle:
                return "sha256 " + hashlib.file_digest(handle, "sha256").hexdigest()[:32]
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--input {input_uri}: no such listing") from None
    return "etag " + str(info.get("ETag") or info.get("etag") or info.get("size"))


def _check_plan(shards: StageFolder, census: Census) -> None:
    """A resumed run's input must be the one its first run took the census of: the shards
    already written were cut from it."""
    uri = shards.path(PLAN_NAME)
    if shards.storage.exists(uri):
        before = json.loads(shards.storage.read_bytes(uri))
        if before["digest"] != census.digest:
            raise StageConflict(f"the input changed since this shard run started ({before['counts']}"
                                f" -> {census.counts}): its finished shards were cut from the old "
                                f"one. Pass --overwrite to shard the new input")  # fmt: skip
    else:
        shards.storage.write_bytes(uri, json.dumps(census.to_json(), indent=2).encode())


def _rescan(shards: StageFolder, finished: Manifest, input_uri: str, config: ShardConfig) -> None:
    rows, kind = input_rows(shards.storage, input_uri, config.val_fraction, config.cpus_per_task)
    census = take_census(rows, kind, config.val_fraction, config.cpus_per_task)
    if census.digest != finished.properties.get("input_digest"):
        raise StageConflict(f"{input_uri} changed since it was sharded into {shards.uri} "
                            f"({finished.counts.get('seen')} inputs then, {census.seen} now): "
                            f"pass --overwrite to shard it again")  # fmt: skip
    print(f"shard: {input_uri} is as it was sharded ({census.seen:,} inputs)")


@single_writer("shard")
def run_shard_stage(
    input_uri: str, run_dir: str, config: ShardConfig, overwrite: bool = False
) -> Manifest:
    """Shard `input_uri` into RUN/shards/ with Ray Data; idempotent and resumable."""
    started = time.time()
    input_uri = absolute(input_uri)  # in the driver: a Ray worker has a working dir of its own
    shards = StageFolder(run_dir, "shard", config.storage)
    storage = shards.storage
    identity = {**output_fields(config), "input": input_uri,
                "input_version": input_version(storage, input_uri)}  # fmt: skip
    planned = Manifest("shard", FORMAT_VERSION, identity, {})
    if (finished := shards.begin(planned, overwrite)) is not None:
        if config.rescan_input:
            _rescan(shards, finished, input_uri, config)
        return finished

    with _sort_shuffle():
        return _shard(input_uri, shards, config, planned, started)


ROWS_PER_PARTITION = 1_000_000  # listed rows (~150 B each) a block of the grouping sort
MIN_PARTITIONS = 8  # the sort's parallelism on a small input


@contextmanager
def _sort_shuffle():
    """Ray Data's sort-based shuffle for the grouping by shard: tasks only, where the hash
    shuffle starts aggregator actors (8-12 s on a 2-core machine before any work; the sort
    shuffle groups 200,000 rows into 40,000 shards in 19 s there)."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    context = DataContext.get_current()
    before, context.shuffle_strategy = (
        context.shuffle_strategy,
        ShuffleStrategy.SORT_SHUFFLE_PULL_BASED,
    )
    try:
        yield
    finally:
        context.shuffle_strategy = before


def _shard(input_uri: str, shards: StageFolder, config: ShardConfig, planned: Manifest,
           started: float) -> Manifest:  # fmt: skip
    storage = shards.storage
    rows, kind = input_rows(storage, input_uri, config.val_fraction, config.cpus_per_task)
    census = take_census(rows, kind, config.val_fraction, config.cpus_per_task)
    if census.seen == 0:
        raise FileNotFoundError(f"no files under {input_uri}: check the path and storage")
    _check_plan(shards, census)
    fp = planned.fingerprint
    storage.remove_temporaries(shards.uri)  # left by writers killed mid-write
    listed = shards.finished_files()  # one listing: the shards a killed run finished
    done = sorted(n.removesuffix(".stats.json") for n in listed if n.endswith(".stats.json"))
    expected = sum(census.shards(s, config.samples_per_shard) for s in census.counts)
    print(f"shard: {census.seen:,} inputs ({kind}) -> about {expected} shards ({len(done)} "
          f"already done) in {shards.uri}")  # fmt: skip

    spill = RejectsSpill()  # the rejects on local disk, not in memory: rejects.py
    try:
        results = {stats["shard"]: spill.add(stats) for stats in _write_pending(
            rows, census, config, shards, fp, set(done), expected)}  # fmt: skip
        earlier = _read_stats(storage, shards, [n for n in done if n not in results])
        results.update((name, spill.add(stats)) for name, stats in earlier)
        names = sorted(results)
        ordered = [results[n] for n in names]
        counts = {"seen": sum(s["seen"] for s in ordered), "ok": sum(s["ok"] for s in ordered),
                  "rejected": sum(s["rejected"] for s in ordered), "shards": len(names)}  # fmt: skip
        if counts["ok"] + counts["rejected"] != counts["seen"] or counts["seen"] != census.seen:
            raise RuntimeError(f"shard: counts do not reconcile: {counts}, inputs {census.seen}")
        spill.write(storage, shards.path("rejects.parquet"), names)
    finally:
        spill.close()
    if census.label_names:
        labels = {name: i for i, name in enumerate(census.label_names)}
        storage.write_bytes(shards.path("labels.json"),
                            json.dumps(labels, indent=2, sort_keys=True).encode())  # fmt: skip
    planned.units = [{"name": f"{s['shard']}.tar", "rows": s["ok"], "bytes": s["bytes"],
                      "captioned": s["captioned"], "max_label": s["max_label"]}
                     for s in ordered]  # fmt: skip
    planned.counts = counts
    planned.properties = {"input_digest": census.digest, "input_kind": kind}
    shards.finish(planned)
    print(f"shard: {counts['ok']:,} ok + {counts['rejected']:,} rejected = {counts['seen']:,} "
          f"seen, {len(names)} shards, {time.time() - started:.1f} s")  # fmt: skip
    return planned


def _write_pending(rows: Any, census: Census, config: ShardConfig, shards: StageFolder, fp: str,
                   done: set[str], expected: int) -> Any:  # fmt: skip
    """The stats of every shard not yet done, as Ray Data writes them (streamed: the driver
    holds one at a time)."""
    import pyarrow.compute as pc

    assigned = rows.map_batches(assign_units, batch_format="pyarrow", num_cpus=config.cpus_per_task,
                                fn_kwargs={"census": census.to_json(),
                                           "val_fraction": config.val_fraction,
                                           "samples_per_shard": config.samples_per_shard})  # fmt: skip
    if done:
        pending_only = lambda t: t.filter(pc.invert(pc.is_in(t["unit"], pa_array(done))))  # noqa: E731
        assigned = assigned.map_batches(pending_only, batch_format="pyarrow",
                                        num_cpus=config.cpus_per_task)  # fmt: skip
    # The sort behind groupby makes (input blocks)^2 pieces: a block a listed row group, folder
    # or tar would mean 1.6 billion at LAION's 40,000 tars. Bounded blocks of ~1M rows instead.
    partitions = max(MIN_PARTITIONS, -(-census.seen // ROWS_PER_PARTITION))
    written = assigned.repartition(partitions).groupby("unit").map_groups(
        write_shard_group, batch_format="pyarrow", num_cpus=config.cpus_per_task,
        max_retries=config.max_retries, fn_args=(config, shards.uri, fp),
    )  # fmt: skip
    remaining = max(0, census.seen - len(done) * config.samples_per_shard)
    progress = Progress("shard", max(1, expected - len(done)), remaining, "inputs")
    rejected = 0
    for row in written.iter_rows():
        stats = json.loads(row["stats"])
        rejected += len(stats["rejects"])
        progress.update(stats["seen"], f", {rejected:,} rejected")
        yield stats


def pa_array(values: set[str]) -> Any:
    import pyarrow as pa

    return pa.array(sorted(values), pa.string())


def _read_stats(
    storage: Storage, shards: StageFolder, names: list[str]
) -> Iterator[tuple[str, dict]]:
    """(name, stats) of the shards a killed run finished, read 32 at a time (off the critical
    path: after this run's shards are written)."""

    def one(name: str) -> dict:
        return json.loads(storage.read_bytes(shards.path(f"{name}.stats.json")))

    with ThreadPoolExecutor(32) as pool:
        for stats in pool.map(one, names):
            yield stats["shard"], stats
