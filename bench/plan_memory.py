"""The shard stage's planning memory on a generated Parquet listing of N rows (default 100M).

    .venv/bin/python bench/plan_memory.py --rows 1000000 10000000 100000000 [--dir /tmp/plan]

For each N: a listing of N rows (`path`, `label`: 1,000 classes; row groups of 1M rows) is
written once under DIR, then the shard stage's planning runs on it as the stage does
(`input_rows` -> `take_census`, then `assign_units` over every row, counted per shard without
writing). The images need not exist: planning never opens them. Printed per N: the driver's
peak RSS above where it started (sampled every 50 ms), bytes per input row, the plan's wall
time and the shard count. The target: a 100M-row listing plans within 8 GB of driver RSS.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scale import PeakRSS  # noqa: E402  (bench/scale.py, beside this file)

GROUP = 1_000_000


def write_listing(path: Path, rows: int) -> None:
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return
    schema = pa.schema([("path", pa.string()), ("label", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, GROUP):
            index = pa.array(range(start, min(rows, start + GROUP)), pa.int64())
            label = pc.remainder(index, 1000)
            names = pc.binary_join_element_wise(
                "images/n",
                pc.cast(label, pa.string()),
                "/",
                pc.cast(index, pa.string()),
                ".jpg",
                "",
            )
            writer.write_table(pa.table({"path": names, "label": label}, schema=schema))


def plan(listing: Path, samples_per_shard: int, val_fraction: float) -> tuple[int, int]:
    """(input rows, shards) as the stage plans them."""
    from pipeline.core.storage import Storage
    from pipeline.stages.shard.listing import assign_units, input_rows, take_census

    storage = Storage()
    rows, kind = input_rows(storage, str(listing), val_fraction, cpus=1)
    census = take_census(rows, kind, val_fraction, cpus=1)
    assigned = rows.map_batches(assign_units, batch_format="pyarrow", num_cpus=1,
                                fn_kwargs={"census": census.to_json(), "val_fraction": val_fraction,
                                           "samples_per_shard": samples_per_shard})  # fmt: skip
    per_unit = assigned.map_batches(
        lambda t: t.group_by("unit").aggregate([("key", "count")]), batch_format="pyarrow"
    )
    shards: set[str] = set()
    for batch in per_unit.iter_batches(batch_format="pyarrow"):
        shards.update(batch.column("unit").to_pylist())
    return census.seen, len(shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000_000])
    parser.add_argument("--dir", default="runs/plan-memory")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    args = parser.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    # A first small plan imports and warms Ray Data in this process (about 250 MB), so the
    # figures below are what planning adds, not what importing it costs.
    write_listing(folder / "warmup.parquet", 10_000)
    plan((folder / "warmup.parquet").resolve(), args.samples_per_shard, 0.0)
    print(
        "| listing rows | driver RSS added (MB) | bytes a row | driver RSS (MB) | plan s | shards |"
    )
    print("|---:|---:|---:|---:|---:|---:|", flush=True)
    for n in args.rows:
        listing = folder / f"listing-{n}.parquet"
        write_listing(listing, n)
        meter, started = PeakRSS(), time.time()
        seen, shards = plan(listing.resolve(), args.samples_per_shard, 0.0)
        seconds, peak = time.time() - started, meter.stop()
        assert seen == n, (seen, n)
        total = meter.peak / 2**20
        print(f"| {n:,} | {peak / 2**20:,.0f} | {peak / n:.2f} | {total:,.0f} | {seconds:,.0f} | "
              f"{shards:,} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
