"""The sample stage: images from the trained RQ-Transformer, decoded by the RQ-VAE, in RUN/samples/.

The request (num_samples, labels, sampling settings, seed) is cut into chunks of `chunk_size`
samples. Sample i gets label labels[i % len(labels)] (default: every class in turn), and chunk
c is generated with a generator seeded from (seed, c), so the same request gives the same
images however many actors share the work. Ray actors (GPU when asked) load both models once
and handle chunks: the cached sampler writes codes, the VAE decodes them, and the chunk's PNGs
and then its code table are written. A table records the stage fingerprint, so a resumed run
redoes only unfinished chunks.

RUN/samples/ (or `out`):
  images/sample-000000.png ...   one PNG per sample
  codes/chunk-00000.parquet ...  the sampled codes, same schema as the encode tables (key
                                 sample-NNNNNN, label, codes), readable by `rqpipe stats/query`
  grid-{label}.png               the first `grid_size` samples of each label (grid.png when
                                 unconditional)
  sampling.json                  samples, seconds, samples/s, actors, device
  config.yaml, _manifest.json
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from model.hub import hub_repo
from pipeline.core.config import output_fields, to_dict, write_resolved_config
from pipeline.core.lease import single_writer
from pipeline.core.manifest import (
    Manifest,
    begin_stage,
    model_fingerprint,
    vae_fingerprint,
    write_manifest,
)
from pipeline.core.progress import Progress
from pipeline.core.storage import (
    Storage,
    StorageConfig,
    absolute,
    join,
    model_files,
    require_model_folders,
    safe_file_name,
)
from pipeline.formats.codes_table import codes_table, finished_table, to_parquet_bytes

FORMAT_VERSION = 1


@dataclass
class SampleConfig:
    section: ClassVar[str] = "sample"
    execution_fields: ClassVar[tuple[str, ...]] = (
        "ar", "vae", "out", "num_actors", "gpus_per_actor", "cpus_per_actor", "max_retries",
        "storage",
        "prompts_file", "prompts_column",  # fingerprinted as the prompts they hold (upstream)
        "rejection_classifier",  # fingerprinted as the hash of its weights (upstream)
    )  # fmt: skip

    num_samples: int = 64
    labels: list[int | str] | None = None  # class indices or names; default: every class
    prompts: list[str] | None = None  # captions, for a text-conditioned model (cycled)
    prompts_file: str | None = None  # more: one a line, or a CSV/Parquet column ...
    prompts_column: str = "caption"  # ... of this name
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 1.0  # classifier-free guidance; 1: none
    seed: int = 0
    # Rejection sampling (the paper's 3.80 FID: 0.05 with a ResNet-101): each sample is the one
    # of round(1 / acceptance_rate) candidates for its class that the classifier finds most
    # likely to be of that class. 1.0: off.
    acceptance_rate: float = 1.0
    rejection_classifier: str | None = None  # a torchvision ImageNet ResNet checkpoint (.pth)
    rejection_arch: str = "resnet101"
    chunk_size: int = 64  # samples per work unit and per seeded generator
    grid_size: int = 16  # samples per label in the grid PNGs
    ar: str | None = None  # RQ-Transformer folder; default RUN/ar/model
    vae: str | None = None  # RQ-VAE folder; default RUN/vae/model
    out: str | None = None  # output folder; default RUN/samples
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    max_retries: int = 3
    storage: StorageConfig = field(default_factory=StorageConfig)

    def preflight(self) -> None:
        """The models this stage will read, checked before any stage of a run starts."""
        require_model_folders(Storage(self.storage), self.section, ar=self.ar, vae=self.vae)
        if self.acceptance_rate < 1 and not Path(self.rejection_classifier).is_file():
            raise FileNotFoundError(f"sample.rejection_classifier {self.rejection_classifier}: "
                                    f"no such file (a torchvision ResNet .pth)")  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("num_samples", "chunk_size", "num_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.labels is not None and not self.labels:
            raise ValueError("labels is empty: give class indices or names, or leave it unset")
        if not 0 < self.acceptance_rate <= 1:
            raise ValueError(f"acceptance_rate must be in (0, 1], got {self.acceptance_rate}")
        if self.acceptance_rate < 1 and not self.rejection_classifier:
            raise ValueError("acceptance_rate < 1 needs rejection_classifier=PATH (a torchvision "
                             "ResNet checkpoint whose classes are the run's labels)")  # fmt: skip
        if self.labels is not None and (self.prompts or self.prompts_file):
            raise ValueError("give labels (a class model) or prompts (a caption model), not both")


def sample_key(index: int) -> str:
    return f"sample-{index:06d}"


def chunk_seed(seed: int, chunk: int) -> int:
    """Independent, reproducible seeds per chunk (not seed + chunk: runs with neighbouring
    seeds would share chunks)."""
    digest = hashlib.sha256(f"{seed}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ChunkSampler:
    """Ray actor: an RQ-Transformer and its RQ-VAE, loaded once, turning chunks into images."""

    def __init__(self, ar_uri: str, vae_uri: str, storage_config: StorageConfig,
                 use_gpu: bool, rejection: tuple[str, str] | None = None) -> None:  # fmt: skip
        import torch

        from model.rqtransformer import RQTransformer
        from model.rqvae import RQVAE

        self.storage = Storage(storage_config)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.ar = RQTransformer.from_pretrained(ar_uri, self.device,
                                                storage_options=self.storage.options(ar_uri))  # fmt: skip
        self.vae = RQVAE.from_pretrained(vae_uri, self.device,
                                         storage_options=self.storage.options(vae_uri))  # fmt: skip
        books = self.vae.quantizer.codebooks
        embeddings = self.ar.code_embeddings
        if embeddings.shape != books.shape or not torch.equal(embeddings, books.float()):
            raise ValueError(f"the RQ-Transformer at {ar_uri} was trained on another codebook "
                             f"than the RQ-VAE at {vae_uri} has: pass the VAE it was trained "
                             f"with (vae=URI)")  # fmt: skip
        self.ar.eval()
        self.vae.eval()
        self.classifier = None
        if rejection is not None:  # (checkpoint path, architecture)
            from model.resnet import load_resnet

            self.classifier = load_resnet(*rejection).to(self.device)

    def sample(self, chunk: int, first: int, labels: list[int] | None, count: int,
               config: SampleConfig, out_dir: str, vae_fp: str, stage_fp: str,
               prompts: list[tuple[str, list[int]]] | None = None) -> dict[str, Any]:  # fmt: skip
        """prompts: (caption, token ids) per sample, for a caption model (labels None)."""
        import torch

        from pipeline.formats.images import to_uint8

        started = time.time()
        generator = torch.Generator(self.device).manual_seed(chunk_seed(config.seed, chunk))
        text = torch.tensor([ids for _, ids in prompts], device=self.device) if prompts else None
        rounds = round(1 / config.acceptance_rate) if self.classifier is not None else 1
        best = None
        for _ in range(rounds):  # rejection sampling: the best of `rounds` candidates a slot
            with torch.no_grad():
                codes = self.ar.generate(
                    num_samples=None if labels or prompts else count, labels=labels,
                    temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                    cfg_scale=config.cfg_scale, generator=generator, text=text,
                )  # (B, H, W, D)  # fmt: skip
                images = to_uint8(self.vae.decode_codes(codes))  # (B, R, R, 3)
                if rounds == 1:
                    break
                pixels = torch.from_numpy(images).permute(0, 3, 1, 2).to(self.device)
                target = torch.tensor(labels, device=self.device)
                score = self.classifier(pixels).log_softmax(1).gather(1, target[:, None])[:, 0]
            if best is None:
                best = (codes, images, score)
            else:
                better = score > best[2]  # (B,)
                best = (torch.where(better[:, None, None, None], codes, best[0]),
                        np.where(better.cpu().numpy()[:, None, None, None], images, best[1]),
                        torch.maximum(score, best[2]))  # fmt: skip
        if best is not None:
            codes, images = best[0], best[1]
        seconds = time.time() - started
        keys = [sample_key(first + i) for i in range(count)]
        for key, pixels in zip(keys, images, strict=True):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            self.storage.write_bytes(join(out_dir, "images", f"{key}.png"), buffer.getvalue())
        captions = [caption for caption, _ in prompts] if prompts else [None] * count
        table = codes_table(keys, labels or [None] * count, captions, codes.cpu().numpy(),
                            self.ar.config.codebook_size, vae_fp, stage_fingerprint=stage_fp)  # fmt: skip
        data = to_parquet_bytes(table)  # last: a finished chunk is one whose table exists
        name = f"chunk-{chunk:05d}.parquet"
        self.storage.write_bytes(join(out_dir, "codes", name), data)
        return {"chunk": chunk, "name": name, "rows": count, "bytes": len(data),
                "seconds": seconds, "device": self.device, "candidates": count * rounds}  # fmt: skip


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


def write_grids(storage: Storage, out_dir: str, labels: list[int | None], label_names: dict[int, str],
                grid_size: int, prompts: list[str] | None = None) -> list[str]:  # fmt: skip
    """grid-{label}-{name}.png per label (grid.png when unconditional), of its first grid_size
    samples; for a caption model `labels` index `prompts`, and each grid is titled by its
    prompt."""
    import torch

    from pipeline.formats.images import image_grid, save_png, titled

    written = []
    for label in sorted(set(labels), key=lambda v: -1 if v is None else v):
        indices = [i for i, v in enumerate(labels) if v == label][:grid_size]
        pixels = []
        for i in indices:
            data = storage.read_bytes(join(out_dir, "images", f"{sample_key(i)}.png"))
            with Image.open(io.BytesIO(data)) as image:
                pixels.append(np.asarray(image.convert("RGB")))
        tiles = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
        per_row = math.ceil(math.sqrt(len(tiles)))
        rows = [tiles[i : i + per_row] for i in range(0, len(tiles), per_row)]
        grid = image_grid(rows, scale=max(1, 96 // tiles.shape[-1]))
        if prompts is not None:
            shown = safe_file_name(prompts[label])[:48]
            name, grid = f"grid-{label:03d}-{shown}.png", titled(grid, prompts[label])
        else:
            shown = safe_file_name(str(label_names.get(label, label)))  # user data
            name = "grid.png" if label is None else f"grid-{label}-{shown}.png"
        uri = join(out_dir, name)
        save_png(grid, uri, storage.options(uri))
        written.append(uri)
    return written


def prompt_tokens(storage: Storage, ar_files: str, ar_uri: str, prompts: list[str],
                  context_length: int) -> np.ndarray:  # fmt: skip
    """(P, L) token ids of the prompts, with the tokenizer saved beside the model."""
    from model.text import encode_captions

    if not prompts:
        raise ValueError(f"the RQ-Transformer at {ar_uri} is text-conditioned: give prompts "
                         f"(--prompt TEXT, repeatable, or --prompts-file FILE)")  # fmt: skip
    if not storage.exists(join(ar_files, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json beside the RQ-Transformer at {ar_uri}: put "
                                f"the tokenizer it was trained with there")  # fmt: skip
    tokenizer_json = storage.read_bytes(join(ar_files, "tokenizer.json")).decode()
    return encode_captions(tokenizer_json, prompts, context_length)


def _model_uri(uri: str) -> tuple[str, str]:
    """-> (the model's URI for the actors, where this process reads its files)."""
    return (uri if hub_repo(uri) else absolute(uri)), model_files(uri)


@single_writer("sample", lambda run_dir, config: config.out or join(run_dir, "samples"))
def run_sample_stage(run_dir: str, config: SampleConfig, overwrite: bool = False) -> Manifest:
    import ray

    started = time.time()
    run_dir = absolute(run_dir)  # before anything reaches a Ray worker (its own cwd)
    storage = Storage(config.storage)
    # hf://org/name models: the actors fetch them; the driver reads a copy in its HF cache
    ar_uri, ar_files = _model_uri(config.ar or join(run_dir, "ar", "model"))
    vae_uri, vae_files = _model_uri(config.vae or join(run_dir, "vae", "model"))
    out_dir = absolute(config.out or join(run_dir, "samples"))
    for what, uri, stage in (
        ("RQ-Transformer", ar_files, "train-ar"),
        ("RQ-VAE", vae_files, "train-vae"),
    ):
        if not storage.exists(join(uri, "config.json")):
            raise FileNotFoundError(f"no {what} at {uri}: run the {stage} stage first "
                                    f"(jobs/{stage.replace('-', '_')}.py) or pass its folder")  # fmt: skip
    ar_config = json.loads(storage.read_bytes(join(ar_files, "config.json")))["config"]
    names_uri = join(run_dir, "shards", "labels.json")
    names = json.loads(storage.read_bytes(names_uri)) if storage.exists(names_uri) else {}
    prompts = resolve_prompts(config, storage)
    tokens = None
    if ar_config.get("text_vocab_size"):  # a caption model: the label cycle indexes prompts
        if config.labels is not None:
            raise ValueError(f"the RQ-Transformer at {ar_uri} is text-conditioned: give "
                             f"prompts, not labels")  # fmt: skip
        tokens = prompt_tokens(storage, ar_files, ar_uri, prompts, ar_config["text_length"])
        cycle = list(range(len(prompts)))
    elif prompts:
        raise ValueError(f"the RQ-Transformer at {ar_uri} is not text-conditioned: prompts need "
                         f"a model trained with train_ar.conditioning=text")  # fmt: skip
    else:
        cycle = resolve_labels(config, ar_config["num_classes"], names)
    if config.cfg_scale != 1.0 and not cycle:
        raise ValueError("cfg_scale needs a class- or caption-conditional model; leave it at 1")
    rejection = None
    if config.acceptance_rate < 1:
        if not cycle or tokens is not None:
            raise ValueError("rejection sampling (acceptance_rate < 1) needs a class model")
        rejection = (absolute(config.rejection_classifier), config.rejection_arch)

    vae_fp = vae_fingerprint(storage, vae_files)
    upstream = {"train-ar": model_fingerprint(storage, ar_files, "train-ar"), "vae": vae_fp}
    if tokens is not None:
        upstream["prompts"] = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:32]
    if rejection is not None:
        with open(rejection[0], "rb") as handle:
            upstream["rejection"] = hashlib.file_digest(handle, "sha256").hexdigest()[:32]
    planned = Manifest("sample", FORMAT_VERSION, output_fields(config), upstream)
    finished = begin_stage(storage, out_dir, planned, overwrite)
    if finished is not None:
        return finished
    write_resolved_config(
        storage, join(out_dir, "config.yaml"), {SampleConfig.section: to_dict(config)}
    )

    n, size = config.num_samples, config.chunk_size
    labels: list[int | None] = [cycle[i % len(cycle)] for i in range(n)] if cycle else [None] * n
    chunks = [(c, c * size, min(n, (c + 1) * size)) for c in range(math.ceil(n / size))]
    results = {}
    for c, _, _ in chunks:
        done = finished_table(storage, join(out_dir, "codes", f"chunk-{c:05d}.parquet"),
                              planned.fingerprint)  # fmt: skip
        if done is not None:
            results[c] = done
    pending = [chunk for chunk in chunks if chunk[0] not in results]
    print(f"sample: {n} samples in {len(chunks)} chunks ({len(results)} already done) with "
          f"{min(config.num_actors, max(1, len(pending)))} actor(s) -> {out_dir}")  # fmt: skip

    actor_class = ray.remote(ChunkSampler).options(
        num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor,
        max_restarts=-1, max_task_retries=config.max_retries,
    )  # fmt: skip
    actors = [actor_class.remote(ar_uri, vae_uri, config.storage, config.gpus_per_actor > 0,
                                 rejection)
              for _ in range(min(config.num_actors, max(1, len(pending))))]  # fmt: skip
    progress = Progress("sample", len(pending), sum(end - first for _, first, end in pending),
                        "samples")  # fmt: skip
    sampling_started, queue, in_flight = time.time(), list(pending), []
    while queue or in_flight:
        while queue and len(in_flight) < 2 * len(actors):
            c, first, end = queue.pop(0)
            chunk_labels = labels[first:end] if cycle and tokens is None else None
            chunk_prompts = [(prompts[i], tokens[i].tolist()) for i in labels[first:end]] \
                if tokens is not None else None  # fmt: skip
            actor = actors[c % len(actors)]
            in_flight.append(actor.sample.remote(c, first, chunk_labels, end - first, config,
                                                 out_dir, vae_fp, planned.fingerprint,
                                                 chunk_prompts))  # fmt: skip
        ready, in_flight = ray.wait(in_flight, num_returns=1)
        result = ray.get(ready[0])
        results[result["chunk"]] = result
        progress.update(result["rows"])
    seconds = time.time() - sampling_started
    for actor in actors:
        ray.kill(actor)

    label_names = {index: name for name, index in names.items()}
    grids = write_grids(storage, out_dir, labels, label_names, config.grid_size,
                        prompts if tokens is not None else None)  # fmt: skip
    sampled = sum(results[c].get("rows", 0) for c in results if "seconds" in results[c])
    report = {"samples": n, "sampled_now": sampled, "seconds": round(seconds, 3),
              "samples_per_s": round(sampled / seconds, 3) if sampled else None,
              "actors": len(actors), "grids": grids, "acceptance_rate": config.acceptance_rate,
              "candidates": sum(r.get("candidates", 0) for r in results.values())}  # fmt: skip
    storage.write_bytes(join(out_dir, "sampling.json"), json.dumps(report, indent=2).encode())
    planned.units = [{k: results[c][k] for k in ("name", "rows", "bytes")} for c, _, _ in chunks]
    planned.counts = {"samples": n, "chunks": len(chunks)}
    write_manifest(storage, out_dir, planned)
    rate = f", {report['samples_per_s']} samples/s" if sampled else ""
    shown = ", ".join(grids) if len(grids) <= 4 else f"{len(grids)} in {out_dir}"
    print(f"sample: {n} images in {time.time() - started:.1f} s{rate}; grids: {shown}")
    return planned
