"""What the sample stage is asked for: the label cycle of a class model, the prompts of a
caption model (flags, a text file, or a CSV/Parquet column) and their token ids."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.stage_folder import StageFolder
from pipeline.core.storage import Storage, absolute, join

if TYPE_CHECKING:
    from pipeline.stages.sample import SampleConfig


def resolve_labels(config: SampleConfig, num_classes: int, names: dict[str, int]) -> list[int]:
    """The label cycle: class indices from config.labels (indices or names), else all classes."""
    if num_classes == 0:
        if config.labels is not None:
            raise ValueError("this RQ-Transformer is unconditional (its tables had no labels): "
                             "leave labels unset")  # fmt: skip
        return []
    if config.labels is None:
        return list(range(num_classes))
    resolved = []
    for label in config.labels:
        index = names.get(label) if isinstance(label, str) and not label.isdigit() else int(label)
        if index is None or not 0 <= index < num_classes:
            known = ", ".join(f"{i}={n}" for n, i in sorted(names.items(), key=lambda kv: kv[1]))
            raise ValueError(f"label {label!r} is not a class of this model: use an index in "
                             f"[0, {num_classes}) or a name ({known or 'no names recorded'})")  # fmt: skip
        resolved.append(index)
    return resolved


def resolve_prompts(config: SampleConfig, storage: Storage) -> list[str]:
    """config.prompts, then config.prompts_file's: one a line (.txt), or a column of a CSV or
    Parquet file (prompts_column)."""
    prompts = list(config.prompts or [])
    uri = config.prompts_file and absolute(config.prompts_file)
    if uri and uri.endswith((".csv", ".parquet")):
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq

        data = io.BytesIO(storage.read_bytes(uri))
        table = pq.read_table(data) if uri.endswith(".parquet") else pa_csv.read_csv(data)
        if config.prompts_column not in table.column_names:
            raise ValueError(f"prompts_file {uri} has no column {config.prompts_column!r} (it "
                             f"has {table.column_names}): set prompts_column")  # fmt: skip
        prompts += [p for p in table.column(config.prompts_column).to_pylist() if p]
    elif uri:
        prompts += [line.strip() for line in storage.read_bytes(uri).decode().splitlines()
                    if line.strip()]  # fmt: skip
    return prompts


DEFAULT_PROMPTS = 16


def default_prompts(storage: Storage, codes: StageFolder) -> list[str]:
    """A caption model asked for no prompts samples the first DEFAULT_PROMPTS distinct captions
    of the run's val tables (train tables where there is no val split), in key order: prompts
    like the data it was trained on. [] when the run has no code tables."""
    import pyarrow.parquet as pq

    manifest = codes.manifest()
    if manifest is None:
        return []
    names = [u["name"] for u in manifest.units]
    found: dict[str, None] = {}
    for name in [n for n in names if n.startswith("val-")] or names:
        filesystem, path = storage.arrow_fs(codes.path(name))
        column = pq.read_table(path, filesystem=filesystem, columns=["caption"]).column("caption")
        found.update(dict.fromkeys(c for c in column.to_pylist() if c))
        if len(found) >= DEFAULT_PROMPTS:
            break
    return list(found)[:DEFAULT_PROMPTS]


def prompt_tokens(storage: Storage, ar_files: str, ar_uri: str, prompts: list[str],
                  context_length: int) -> np.ndarray:  # fmt: skip
    """(P, L) token ids of the prompts, with the tokenizer saved beside the model."""
    from model.text import encode_captions

    if not prompts:
        raise ValueError(f"the RQ-Transformer at {ar_uri} is text-conditioned and the run has no "
                         f"captions to take prompts from: give prompts (--prompt TEXT, "
                         f"repeatable, or --prompts-file FILE)")  # fmt: skip
    if not storage.exists(join(ar_files, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json beside the RQ-Transformer at {ar_uri}: put "
                                f"the tokenizer it was trained with there")  # fmt: skip
    tokenizer_json = storage.read_bytes(join(ar_files, "tokenizer.json")).decode()
    return encode_captions(tokenizer_json, prompts, context_length)
