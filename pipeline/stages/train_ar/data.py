"""train-ar's data: the code tables as a streaming Ray Dataset, the validation rows, the caption
tokenizer and the RQ-VAE codebook the tables were encoded with."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.parquet as pq

from model.text import encode_captions, train_tokenizer
from pipeline.core.manifest import vae_fingerprint
from pipeline.core.storage import Storage, absolute, join
from pipeline.core.training import epoch_file_order, read_blocks
from pipeline.formats.codes_table import CodeTables, first_views, read_captions, table_to_arrays


def train_dataset(storage: Storage, tables: CodeTables, columns: list[str], seed: int = 0,
                  text: dict[str, Any] | None = None):  # fmt: skip
    """Streaming Ray Dataset of the train tables as arrays, the tables in a new seeded order
    each epoch (a resume starts at its checkpoint's epoch: core/training.py); the workers'
    shuffle buffer mixes rows across tables (shuffled_batches). Tables with augmented views
    give every row its `slot` (the epoch it is trained in), drawn from `seed`."""
    import ray.data

    filesystem, source, skip = _train_source(storage, tables.train)
    dataset = ray.data.read_parquet(source, filesystem=filesystem, skip_paths=skip,
                                    override_num_blocks=read_blocks(len(tables.train)),
                                    shuffle=epoch_file_order(seed))  # fmt: skip
    if tables.views > 1:
        columns = [*columns, "key", "view"]
    return dataset.select_columns(columns).map_batches(
        table_to_arrays, batch_format="pyarrow", batch_size=1024,
        fn_kwargs={"code_shape": tables.code_shape, "null_label": tables.num_classes,
                   "text": text, "views": tables.views, "seed": seed},
    )  # fmt: skip


def _train_source(storage: Storage, train: list[str]) -> tuple[Any, Any, list[str]]:
    """(filesystem, what read_parquet reads, what it skips) for the train tables. Their folder,
    with every other file in it skipped: given a list of files, Ray Data asks a HEAD for each
    on the driver, one after another (~70 ms each at 30 ms a request: 47 min before the first
    step at 40,000 tables); a folder it lists in pages (docs/scale.md)."""
    folder = train[0].rsplit("/", 1)[0]
    filesystem, directory = storage.arrow_fs(folder)
    paths = [storage.arrow_fs(uri)[1] for uri in train]
    if any(path.rsplit("/", 1)[0] != directory for path in paths):  # several folders
        return filesystem, paths, []
    fs, fs_path = storage.fs(folder)
    prefix = len(fs_path.rstrip("/"))  # fsspec's paths and arrow's may differ in form
    listed = {directory + found[prefix:] for found in fs.find(fs_path)}
    return filesystem, directory, sorted(listed.difference(paths))


def validation_rows(storage: Storage, tables: CodeTables, count: int, columns: list[str],
                    text: dict[str, Any] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Up to `count` held-out rows (the val tables; the first train table if there are none),
    with the columns training reads: codes, label and, for soft targets, latents; for a
    caption model the caption tokens (no BPE dropout)."""
    arrays: list[dict[str, np.ndarray]] = []
    for uri in tables.val or tables.train[:1]:
        filesystem, path = storage.arrow_fs(uri)
        names = pq.read_schema(path, filesystem=filesystem).names
        read = columns + (["view"] if "view" in names else [])
        table = first_views(pq.read_table(path, filesystem=filesystem, columns=read))
        arrays.append(table_to_arrays(table, tables.code_shape, tables.num_classes, text))
        if sum(len(a["label"]) for a in arrays) >= count:
            break
    return {k: np.concatenate([a[k] for a in arrays])[:count] for k in arrays[0]}


def caption_tokenizer(storage: Storage, config: Any, tables: CodeTables) -> str:
    """The tokenizer.json text: the user's (text.tokenizer), or a BPE trained on a seeded
    sample of at most `text.tokenizer_sample` train captions (deterministic: the same tables and
    config train the same one, whatever the run's seed)."""
    if config.text.tokenizer:
        return storage.read_bytes(absolute(config.text.tokenizer)).decode()
    size = config.text.tokenizer_sample
    captions = (read_captions(storage, tables.train) if tables.train_images <= size
                else caption_sample(storage, tables.train, size))  # fmt: skip
    return train_tokenizer(captions, config.text.vocab_size)


def caption_sample(storage: Storage, uris: list[str], size: int, seed: int = 0) -> list[str]:
    """At most `size` captions (each image's once), from the tables taken in a seeded order
    until there are enough, then a seeded subset of them in table order: bounded reads and
    memory whatever the number of tables."""
    order = np.random.default_rng(seed).permutation(len(uris))
    captions: list[str] = []
    for index in order:
        captions += read_captions(storage, [uris[index]])
        if len(captions) >= size:
            break
    if len(captions) > size:
        keep = np.sort(np.random.default_rng(seed + 1).choice(len(captions), size, replace=False))
        captions = [captions[i] for i in keep]
    return captions


def preview_prompts(storage: Storage, tables: CodeTables, text: dict[str, Any], count: int,
                    ar_dir: str) -> np.ndarray | None:  # fmt: skip
    """Up to 8 distinct val captions for samples.png (their token ids), named in samples.txt."""
    if count <= 0:
        return None
    captions = list(dict.fromkeys(c for c in read_captions(storage, tables.val or
                                                           tables.train[:1]) if c))[:8]  # fmt: skip
    storage.write_bytes(join(ar_dir, "samples.txt"), "\n".join(
        f"row {i + 1}: {c}" for i, c in enumerate(captions)).encode() + b"\n")  # fmt: skip
    return encode_captions(captions=captions, **text)


def load_code_embeddings(storage: Storage, vae_uri: str, tables: CodeTables) -> np.ndarray:
    """The VAE's codebook (books, K, C), after checking that it made the tables."""
    from model.rqvae import RQVAE

    if not storage.exists(join(vae_uri, "config.json")):
        raise FileNotFoundError(f"no RQ-VAE at {vae_uri}: the codebook comes from the VAE that "
                                f"encoded the tables; pass vae=URI")  # fmt: skip
    found = vae_fingerprint(storage, vae_uri)
    if found != tables.vae_fingerprint:
        raise ValueError(f"the code tables were encoded with RQ-VAE {tables.vae_fingerprint}, "
                         f"but {vae_uri} is {found}: pass vae=URI of the VAE that encoded them, "
                         f"or re-run encode with this one")  # fmt: skip
    vae = RQVAE.from_pretrained(vae_uri, storage_options=storage.options(vae_uri))
    return vae.quantizer.codebooks.numpy().copy()
