"""The code-stack table: one Parquet file per input shard, the product's main artifact.

| column  | type                                  | meaning                                    |
| key     | string                                | the sample's WebDataset key                |
| label   | int32, nullable                       | class index, where the dataset has one     |
| caption | string, nullable                      | where the dataset has one                  |
| codes   | fixed_size_list<uint16>[H*W*D]        | raster order over (h, w), depth fastest;   |
|         | (uint32 when K > 65536)               | codes.reshape(H, W, D) gives the stack     |
| psnr    | float32 (optional)                    | reconstruction PSNR of the image, dB       |
| latents | fixed_size_list<float16>[H*W*C]       | encoder output before quantization, (h, w, |
|         | (optional)                            | c) order: soft codes without the encoder   |

Rows are sorted by key; zstd compression. File metadata (key b"rqpipe"): JSON with code_shape
[H, W, D], codebook_size, vae_fingerprint, format_version, and stage_fingerprint (the encode or
sample run that wrote the file).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
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
) -> pa.Table:
    """codes (N, H, W, D) integer array -> the table, sorted by key, with its metadata."""
    n, h, w, d = codes.shape
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    numpy_type = np.uint16 if codebook_size <= 65536 else np.uint32
    flat = codes.reshape(n, h * w * d)[order].astype(numpy_type)
    columns: dict[str, pa.Array] = {
        "key": pa.array([keys[i] for i in order], pa.string()),
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


def finished_table(storage: Any, uri: str, stage_fingerprint: str) -> dict[str, Any] | None:
    """The unit record {"name", "rows", "bytes"} of a table written by a stage run with this
    fingerprint; None when it is missing or was made differently (then it is redone)."""
    if not storage.exists(uri):
        return None
    filesystem, path = storage.arrow_fs(uri)
    metadata = pq.read_metadata(path, filesystem=filesystem)
    schema = metadata.schema.to_arrow_schema()
    if table_metadata(schema).get("stage_fingerprint") != stage_fingerprint:
        return None
    size = filesystem.get_file_info(path).size
    return {"name": uri.rsplit("/", 1)[-1], "rows": metadata.num_rows, "bytes": size}
