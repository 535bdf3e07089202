"""The shard driver's memory for rejects: held in a list (before) against `RejectsSpill`.

    .venv/bin/python bench/rejects_spill.py --rejects 1000000 4000000

For each count, in a fresh process each way: that many rejects (a LAION-like source URI and a
decode error, 500 a shard) pass through the driver as the shard stage's stats deliver them,
then `rejects.parquet` is written (spill only). Printed: the peak RSS above where the process
started (after its imports) and the wall time. The target: flat in the number of rejects.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PER_SHARD = 500


def shard_rejects(shard: int) -> list[dict[str, str]]:
    return [{"source": f"s3://bucket/laion/part-{shard:05d}/{i:09d}.jpg",
             "reason": "cannot identify image file"} for i in range(PER_SHARD)]  # fmt: skip


def one_way(mode: str, count: int) -> None:
    sys.path.insert(0, str(REPO))
    from pipeline.core.storage import Storage
    from pipeline.stages.shard.rejects import RejectsSpill

    names = [f"train-{s:06d}" for s in range(count // PER_SHARD)]
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.time()
    if mode == "list":  # what the driver did: every shard's rejects kept to the end
        held = [r for s in range(len(names)) for r in shard_rejects(s)]
        assert len(held) == count
    else:
        spill = RejectsSpill()
        for s, name in enumerate(names):
            spill.add({"shard": name, "rejects": shard_rejects(s)})
        with tempfile.TemporaryDirectory() as out:
            spill.write(Storage(), f"{out}/rejects.parquet", names)
        spill.close()
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) / 1024
    print(f"| {count:,} | {mode} | +{peak:,.0f} MB | {time.time() - started:.1f} s |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rejects", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # MODE COUNT: a child run
    args = parser.parse_args()
    if args.one:
        one_way(args.one[0], int(args.one[1]))
        return
    print("| rejects | driver holds | peak RSS | time |\n|---:|---|---:|---:|", flush=True)
    for count in args.rejects:
        for mode in ("list", "spill"):
            subprocess.run([sys.executable, __file__, "--one", mode, str(count)], check=True)


if __name__ == "__main__":
    main()
