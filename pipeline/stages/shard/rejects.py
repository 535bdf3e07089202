"""RUN/shards/rejects.parquet without every reject in the driver's memory.

Each shard's writer reports its rejects (in its stats); a run over LAION-400M may reject tens
of millions of inputs (GBs as Python dicts). The driver spills each shard's rejects to a local
Parquet file as its stats arrive, keeps only their count, and at the end streams the spill, in
shard order, into one Parquet file that is uploaded whole: the same bytes whatever order the
shards finished in, and at most ROWS_PER_GROUP rejects in memory.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.storage import Storage

SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string())])
ROWS_PER_GROUP = 65_536


class RejectsSpill:
    """Rejects by shard on the driver's local disk, then written as one table."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="rqpipe-rejects-")

    def add(self, stats: dict[str, Any]) -> dict[str, Any]:
        """A shard's stats with its rejects spilled: `rejects` replaced by their count."""
        rejects = stats.pop("rejects")
        stats["rejected"] = len(rejects)
        if rejects:
            table = pa.Table.from_pylist(rejects, schema=SCHEMA)
            pq.write_table(table, self._path(stats["shard"]))
        return stats

    def write(self, storage: Storage, uri: str, shards: list[str]) -> None:
        """rejects.parquet at `uri`: the rejects of `shards`, in that order (an empty table with
        the schema when there are none)."""
        local = os.path.join(self._folder.name, "rejects.parquet")
        pending: list[pa.Table] = []
        rows = 0
        with pq.ParquetWriter(local, SCHEMA, compression="zstd") as writer:
            for shard in shards:
                if os.path.exists(self._path(shard)):
                    pending.append(pq.read_table(self._path(shard)))
                    rows += len(pending[-1])
                if rows >= ROWS_PER_GROUP:
                    writer.write_table(pa.concat_tables(pending))
                    pending, rows = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending))
        storage.upload_file(local, uri)

    def close(self) -> None:
        self._folder.cleanup()

    def _path(self, shard: str) -> str:
        return os.path.join(self._folder.name, f"{shard}.parquet")
