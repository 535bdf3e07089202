"""The code-stack table: one Parquet file per input shard, the product's main artifact.

| column  | type                                  | meaning                                    |
| key     | string                                | the sample's WebDataset key                |
| label   | int32, nullable                       | class index, where the dataset has one     |
| view    | uint8                                 | 0: the image's centre crop; 1..N-1 its    |
|         |                                       | augmented views (encode.views)             |
| caption | string, nullable                      | where the dataset has one (a flipped       |
|         |                                       | view's with left and right swapped)        |
| codes   | fixed_size_list<uint16>[H*W*D]        | raster order over (h, w), depth fastest;   |
|         | (uint32 when K > 65536)               | codes.reshape(H, W, D) gives the stack     |
| psnr    | float32 (optional)                    | reconstruction PSNR of the image, dB       |
| latents | fixed_size_list<float16>[H*W*C]       | encoder output before quantization, (h, w, |
|         | (optional)                            | c) order: soft codes without the encoder   |

Rows are sorted by (key, view): one row per image, or per view of an image; zstd compression. File metadata (key b"rqpipe"): JSON with code_shape
[H, W, D], codebook_size, vae_fingerprint, format_version, and stage_fingerprint (the encode or
sample run that wrote the file).
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.storage import Storage, join

FORMAT_VERSION = 2  # 2: the view column
METADATA_KEY = b"rqpipe"


def code_type(codebook_size: int) -> pa.DataType:
    return pa.uint16() if codebook_size <= 65536 else pa.uint32()


def codes_table(
    keys: list[str],
    labels: list[int | None],
    captions: list[str | None],
    codes: np.ndarray,
    codebook_size: int,
    vae_fingerprint: str,
    psnr: np.ndarray | None = None,
    latents: np.ndarray | None = None,
    stage_fingerprint: str | None = None,
    views: list[int] | None = None,
) -> pa.Table:
    """codes (N, H, W, D) integer array -> the table, sorted by (key, view), with its
    metadata. `views`: each row's view number (default: all 0, one row per image)."""
    n, h, w, d = codes.shape
    views = [0] * n if views is None else list(views)
    order = sorted(range(n), key=lambda i: (keys[i], views[i]))
    numpy_type = np.uint16 if codebook_size <= 65536 else np.uint32
    flat = codes.reshape(n, h * w * d)[order].astype(numpy_type)
    columns: dict[str, pa.Array] = {
        "key": pa.array([keys[i] for i in order], pa.string()),
        "view": pa.array([views[i] for i in order], pa.uint8()),
        "label": pa.array([labels[i] for i in order], pa.int32()),
        "caption": pa.array([captions[i] for i in order], pa.string()),
        "codes": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), h * w * d),
    }
    if psnr is not None:
        columns["psnr"] = pa.array(psnr[order].astype(np.float32), pa.float32())
    if latents is not None:  # (N, H, W, C)
        flat_latents = latents.reshape(n, -1)[order].astype(np.float16)
        columns["latents"] = pa.FixedSizeListArray.from_arrays(
            pa.array(flat_latents.reshape(-1), pa.float16()), flat_latents.shape[1]
        )
    metadata = {"code_shape": [h, w, d], "codebook_size": codebook_size,
                "vae_fingerprint": vae_fingerprint, "format_version": FORMAT_VERSION}  # fmt: skip
    if stage_fingerprint is not None:  # the run that wrote it: resumes skip finished tables
        metadata["stage_fingerprint"] = stage_fingerprint
    table = pa.table(columns)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})


def to_parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def table_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not an rqpipe code table: no 'rqpipe' metadata in the Parquet schema")
    return json.loads(raw)


def codes_array(table: pa.Table) -> np.ndarray:
    """The codes column back to (N, H, W, D) int64."""
    h, w, d = table_metadata(table.schema)["code_shape"]
    flat = table.column("codes").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.int64).reshape(len(table), h, w, d)


# -- reading tables for training ------------------------------------------------------------------


def view_slots(keys: list[str], views: np.ndarray, num_views: int, seed: int) -> np.ndarray:
    """(B,) each row's slot, (view - offset) mod num_views, the offset drawn from (seed, key):
    epoch e trains on the rows of slot e mod num_views (core/training.py one_view_per_image),
    so each image shows its views in an order of its own."""
    offsets = np.array([zlib.crc32(f"{seed}/{k}".encode()) % num_views for k in keys])
    return (views.astype(np.int64) - offsets) % num_views


def table_to_arrays(batch: pa.Table, code_shape: list[int], null_label: int,
                    text: dict[str, Any] | None = None, views: int = 1,
                    seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Ray Data map (pyarrow batches): code-table rows -> {"codes": (B, H, W, D) int32,
    "label": (B,) int64 with missing labels as the null label, ["latents": (B, H, W, C)],
    ["text": (B, L) int64 caption token ids], ["slot": (B,) int64 with views > 1: the epoch
    each row's view belongs to, `view_slots`]}. `text`: encode_captions' keyword arguments
    (tokenizer_json, context_length, bpe_dropout), when the model reads captions."""
    h, w, d = code_shape
    flat = batch.column("codes").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    labels = batch.column("label").to_numpy(zero_copy_only=False)  # float with NaN for nulls
    arrays = {
        "codes": flat.astype(np.int32).reshape(len(batch), h, w, d),
        "label": np.where(np.isnan(labels), null_label, labels).astype(np.int64),
    }
    if "latents" in batch.column_names:
        latents = batch.column("latents").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        arrays["latents"] = latents.reshape(len(batch), h, w, -1)
    if text is not None:
        from model.text import encode_captions

        arrays["text"] = encode_captions(captions=batch.column("caption").to_pylist(), **text)
    if views > 1:
        arrays["slot"] = view_slots(batch.column("key").to_pylist(),
                                    batch.column("view").to_numpy(), views, seed)  # fmt: skip
    return arrays


@dataclass
class CodeTables:
    """What the driver learns from the tables before training."""

    train: list[str]
    val: list[str]
    code_shape: list[int]
    codebook_size: int
    vae_fingerprint: str
    num_classes: int
    has_latents: bool
    rows: int
    train_rows: int  # rows: with augmented views, views x the images
    captioned: int = 0  # images (or, read from older tables, rows) with a non-empty caption
    views: int = 1  # code stacks per train image (encode.views)

    @property
    def train_images(self) -> int:
        return self.train_rows // self.views


def code_tables(storage: Storage, codes_dir: str, units: list[dict[str, Any]],
                properties: dict[str, Any]) -> CodeTables:  # fmt: skip
    """What train-ar needs to know of the encode stage's tables, from its manifest (`units`,
    `properties`) without reading a table; an older manifest without properties: from the
    tables themselves (`inspect_tables`, a few requests a table)."""
    if not properties:
        return inspect_tables(storage, codes_dir, units)
    train, val = _splits([join(codes_dir, unit["name"]) for unit in units])
    rows = {join(codes_dir, unit["name"]): int(unit["rows"]) for unit in units}
    return CodeTables(train, val, list(properties["code_shape"]), properties["codebook_size"],
                      properties["vae_fingerprint"], properties["num_classes"],
                      properties["latents"], sum(rows.values()), sum(rows[u] for u in train),
                      properties["captioned_images"], properties["views"])  # fmt: skip


def _splits(uris: list[str]) -> tuple[list[str], list[str]]:
    train = [u for u in uris if u.rsplit("/", 1)[-1].startswith("train-")]
    val = [u for u in uris if u.rsplit("/", 1)[-1].startswith("val-")]
    if not train:  # tables not made from a split shard set: train on all of them
        return uris, []
    return train, val


def inspect_tables(storage: Storage, codes_dir: str, units: list[dict[str, Any]]) -> CodeTables:
    """CodeTables read from the tables: their metadata, labels and captions."""
    uris = [join(codes_dir, unit["name"]) for unit in units]
    train, val = _splits(uris)
    metas, max_label, has_latents, captioned = [], -1, True, 0
    for uri in uris:
        filesystem, path = storage.arrow_fs(uri)
        schema = pq.read_schema(path, filesystem=filesystem)
        metas.append(table_metadata(schema))
        has_latents = has_latents and "latents" in schema.names
        read = pq.read_table(path, filesystem=filesystem, columns=["label", "caption"])
        labels, captions = read.column("label"), read.column("caption")
        if labels.null_count < len(labels):
            max_label = max(max_label, pc.max(labels).as_py())
        captioned += pc.sum(pc.greater(pc.utf8_length(captions), 0)).as_py() or 0
    shapes = {(tuple(m["code_shape"]), m["codebook_size"], m["vae_fingerprint"]) for m in metas}
    if len(shapes) != 1:
        raise ValueError(f"the tables in {codes_dir} come from different RQ-VAEs or code shapes "
                         f"({sorted(shapes)}): re-run encode with --overwrite")  # fmt: skip
    (shape, k, fp) = shapes.pop()
    rows = {join(codes_dir, unit["name"]): int(unit["rows"]) for unit in units}
    return CodeTables(train, val, list(shape), k, fp, max_label + 1, has_latents,
                      sum(rows.values()), sum(rows[u] for u in train), captioned)  # fmt: skip


def read_captions(storage: Storage, uris: list[str]) -> list[str]:
    """Every image's caption (missing ones as ""), in table and row order: view 0's where
    the tables hold augmented views."""
    captions: list[str] = []
    for uri in uris:
        filesystem, path = storage.arrow_fs(uri)
        names = pq.read_schema(path, filesystem=filesystem).names
        columns = ["caption"] + (["view"] if "view" in names else [])
        table = first_views(pq.read_table(path, filesystem=filesystem, columns=columns))
        captions += [c or "" for c in table.column("caption").to_pylist()]
    return captions


def first_views(table: pa.Table) -> pa.Table:
    """The rows of view 0 (each image once) of a table that may hold augmented views."""
    if "view" not in table.column_names:
        return table
    return table.filter(pc.equal(table.column("view"), 0))
