"""Questions users ask of the code tables: `rqpipe stats`, `rqpipe query`, `rqpipe decode`."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.manifest import read_manifest
from pipeline.core.storage import Storage, join, model_files
from pipeline.formats.codes_table import METADATA_KEY, codes_array, first_views, table_metadata


def codes_dir(storage: Storage, uri: str) -> str:
    """Where the code tables of `uri` are: a run dir means its codes/ folder."""
    uri = uri.rstrip("/")
    if not uri.endswith(".parquet") and storage.exists(join(uri, "codes", "_manifest.json")):
        return join(uri, "codes")
    return uri


def table_files(storage: Storage, codes_uri: str) -> list[str]:
    """The code tables of a run dir, an encode output (its manifest's tables), one .parquet,
    or any folder: there, only the Parquet files that are code tables (not rejects.parquet)."""
    codes_uri = codes_dir(storage, codes_uri)
    if codes_uri.endswith(".parquet"):
        return [codes_uri]
    manifest = read_manifest(storage, codes_uri)
    if manifest is not None and manifest.stage == "encode":
        return [join(codes_uri, unit["name"]) for unit in manifest.units]
    files = []
    for uri, _ in storage.list_files(codes_uri):
        if uri.endswith(".parquet"):
            filesystem, path = storage.arrow_fs(uri)
            if METADATA_KEY in (pq.read_schema(path, filesystem=filesystem).metadata or {}):
                files.append(uri)
    if not files:
        raise FileNotFoundError(f"no rqpipe code tables under {codes_uri}: give a run dir, its "
                                f"codes/ folder or one .parquet table")  # fmt: skip
    return files


def read_codes(storage: Storage, codes_uri: str, columns: list[str] | None = None) -> pa.Table:
    tables = []
    for uri in table_files(storage, codes_uri):
        filesystem, path = storage.arrow_fs(uri)
        tables.append(pq.read_table(path, filesystem=filesystem, columns=columns))
    return pa.concat_tables(tables)


def code_stats(table: pa.Table, top: int = 10, max_duplicate_groups: int = 20) -> dict[str, Any]:
    """Per-depth usage, entropy and perplexity, frequent codes and duplicate stacks of the
    images' codes (view 0 of tables with augmented views: each image once)."""
    table = first_views(table)
    meta = table_metadata(table.schema)
    k = meta["codebook_size"]
    codes = codes_array(table)  # (N, H, W, D)
    depths = []
    for d in range(codes.shape[-1]):
        counts = np.bincount(codes[..., d].ravel(), minlength=k)
        p = counts[counts > 0] / counts.sum()
        entropy = float(-(p * np.log2(p)).sum())
        order = np.argsort(-counts, kind="stable")[:top]
        depths.append({"depth": d + 1, "used_percent": float((counts > 0).mean() * 100),
                       "entropy_bits": entropy, "perplexity": float(2**entropy),
                       "top_codes": [[int(c), int(counts[c])] for c in order],
                       "counts": counts})  # fmt: skip
    groups: dict[bytes, list[str]] = defaultdict(list)
    for key, row in zip(table.column("key").to_pylist(), codes.reshape(len(codes), -1),
                        strict=True):  # fmt: skip
        groups[row.tobytes()].append(key)
    duplicates = sorted((sorted(keys) for keys in groups.values() if len(keys) > 1),
                        key=lambda keys: (-len(keys), keys))  # fmt: skip
    labels = Counter(table.column("label").to_pylist())
    return {"rows": len(table), "code_shape": meta["code_shape"], "codebook_size": k,
            "max_entropy_bits": math.log2(k), "depths": depths,
            "duplicate_groups": duplicates[:max_duplicate_groups],
            "duplicate_rows": sum(len(g) for g in duplicates),
            "labels": {str(k): v for k, v in sorted(labels.items(), key=lambda kv: str(kv[0]))}}  # fmt: skip


def format_stats(stats: dict[str, Any]) -> str:
    h, w, d = stats["code_shape"]
    lines = [f"rows: {stats['rows']:,}   code shape: {h}x{w}x{d}   codebook: "
             f"{stats['codebook_size']:,} codes (max entropy {stats['max_entropy_bits']:.2f} bits)",
             "", f"{'depth':>5} {'used %':>7} {'entropy bits':>13} {'perplexity':>11}  most frequent (code:count)"]  # fmt: skip
    for depth in stats["depths"]:
        top = " ".join(f"{c}:{n}" for c, n in depth["top_codes"][:5])
        lines.append(f"{depth['depth']:>5} {depth['used_percent']:>7.1f} "
                     f"{depth['entropy_bits']:>13.2f} {depth['perplexity']:>11.1f}  {top}")  # fmt: skip
    lines.append("")
    lines.append(f"exact duplicate code stacks: {len(stats['duplicate_groups'])} group(s), "
                 f"{stats['duplicate_rows']} rows")  # fmt: skip
    for keys in stats["duplicate_groups"][:10]:
        lines.append("  " + ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else ""))
    lines.append("per label: " + ", ".join(f"{k}: {v}" for k, v in stats["labels"].items()))
    return "\n".join(lines)


def plot_usage(stats: dict[str, Any], path: str, storage: Storage) -> None:
    """Per depth: the code frequencies, sorted, on a log scale (how evenly codes are used)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = stats["depths"]
    fig, axes = plt.subplots(1, len(depths), figsize=(3.2 * len(depths), 3), sharey=True)
    for ax, depth in zip(np.atleast_1d(axes), depths, strict=True):
        counts = np.sort(depth["counts"])[::-1]
        ax.bar(np.arange(len(counts)), np.maximum(counts, 0.5), width=1.0, color="#4472c4")
        ax.set_yscale("log")
        ax.set_title(f"depth {depth['depth']}: {depth['used_percent']:.0f}% used, "
                     f"ppl {depth['perplexity']:.0f}", fontsize=9)  # fmt: skip
        ax.set_xlabel("codes, most used first")
    np.atleast_1d(axes)[0].set_ylabel("count")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, buffer.getvalue())


def query(storage: Storage, codes_uri: str, sql: str) -> pa.Table:
    """Run DuckDB SQL with a view `codes` over every table under codes_uri."""
    import duckdb

    connection = duckdb.connect()
    files = table_files(storage, codes_uri)
    if not files[0].startswith("/") and "://" in files[0]:
        fs, _ = storage.fs(files[0])
        connection.register_filesystem(fs)  # DuckDB cannot install httpfs offline
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    connection.execute(f"CREATE VIEW codes AS SELECT * FROM read_parquet([{listed}])")
    try:
        return connection.sql(sql).to_arrow_table()
    except duckdb.Error as e:  # a user's typo: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"SQL error: {first} (the view is named codes; columns: "
            f"{', '.join(connection.sql('SELECT * FROM codes').columns)})"
        ) from None


def decode_key(storage: Storage, codes_uri: str, key: str, depth: int | None,
               vae_uri: str | None = None) -> np.ndarray:  # fmt: skip
    """The image of one stored code stack, at `depth` (coarse) or full depth: (R, R, 3) uint8."""
    import pyarrow.compute as pc
    import torch

    from model.rqvae import RQVAE
    from pipeline.core.manifest import vae_fingerprint

    table = read_codes(storage, codes_uri)
    row = table.filter(pc.equal(table.column("key"), key))
    if len(row) == 0:
        raise KeyError(f"no row with key {key!r} in {codes_uri}")
    if vae_uri is None:
        base = codes_dir(storage, codes_uri)
        run = base.rsplit("/", 2)[0] if base.endswith(".parquet") else base.rsplit("/", 1)[0]
        vae_uri = join(run, "vae", "model")
    expected = table_metadata(table.schema)["vae_fingerprint"]
    vae_uri = model_files(vae_uri)  # a Hub model: its copy in the Hugging Face cache
    if vae_fingerprint(storage, vae_uri) != expected:
        raise ValueError(f"the tables were encoded by another VAE than {vae_uri} "
                         f"(table fingerprint {expected}); pass --vae with the right one")  # fmt: skip
    model = RQVAE.from_pretrained(vae_uri, storage_options=storage.options(vae_uri))
    codes = torch.from_numpy(codes_array(row))
    image = model.decode_codes(codes, depth).clamp(-1, 1)[0]  # (3, R, R)
    return ((image.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
