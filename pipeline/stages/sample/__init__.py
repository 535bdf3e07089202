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

from pipeline.core.actor_pool import POOL_FIELDS, ActorPool, ActorPoolConfig
from pipeline.core.config import output_fields
from pipeline.core.lease import single_writer
from pipeline.core.manifest import Manifest, model_fingerprint, vae_fingerprint
from pipeline.core.progress import Progress
from pipeline.core.stage_folder import StageFolder
from pipeline.core.storage import (
    Storage,
    StorageConfig,
    absolute,
    join,
    model_location,
    read_json,
    read_model_config,
    require_model_folders,
    safe_file_name,
)
from pipeline.stages.sample.actor import ChunkSampler, sample_key
from pipeline.stages.sample.prompts import (
    default_prompts,
    prompt_tokens,
    resolve_labels,
    resolve_prompts,
)

__all__ = ["SampleConfig", "resolve_prompts", "run_sample_stage"]

FORMAT_VERSION = 1


@dataclass
class SampleConfig(ActorPoolConfig):
    section: ClassVar[str] = "sample"
    execution_fields: ClassVar[tuple[str, ...]] = (
        *POOL_FIELDS,
        "ar", "vae", "out", "storage",
        "prompts_file", "prompts_column",  # fingerprinted as the prompts they hold (upstream)
        "rejection_classifier",  # fingerprinted as the hash of its weights (upstream)
        "cuda_graphs",  # how a GPU actor runs the sampler, not what it samples
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
    # GPU actors record each sampling step as a CUDA graph (fixed-shape KV caches: one launch a
    # step, not one a kernel; RQTransformer.generate `static`). false: the growing caches.
    cuda_graphs: bool = True
    storage: StorageConfig = field(default_factory=StorageConfig)

    def preflight(self) -> None:
        """The models this stage will read, checked before any stage of a run starts."""
        require_model_folders(Storage(self.storage), self.section, ar=self.ar, vae=self.vae)
        if self.acceptance_rate < 1 and not Path(self.rejection_classifier).is_file():
            raise FileNotFoundError(f"sample.rejection_classifier {self.rejection_classifier}: "
                                    f"no such file (a torchvision ResNet .pth)")  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_samples", "chunk_size"):
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


@single_writer("sample", lambda run_dir, config: config.out)
def run_sample_stage(run_dir: str, config: SampleConfig, overwrite: bool = False) -> Manifest:
    started = time.time()
    out = StageFolder(run_dir, "sample", config.storage, config.out)
    storage = out.storage
    # hf://org/name models: the actors fetch them; the driver reads a copy in its HF cache
    ar_uri, ar_files = model_location(config.ar or out.run_path("ar", "model"))
    vae_uri, vae_files = model_location(config.vae or out.run_path("vae", "model"))
    ar_config = read_model_config(storage, ar_files, "RQ-Transformer", "run the train-ar stage "
                                  "first (jobs/train_ar.py) or pass its folder (ar=URI)")  # fmt: skip
    read_model_config(storage, vae_files, "RQ-VAE", "run the train-vae stage first "
                      "(jobs/train_vae.py) or pass its folder (vae=URI)")  # fmt: skip
    names = read_json(storage, out.of("shard").path("labels.json"), {})
    prompts = resolve_prompts(config, storage)
    tokens = None
    if ar_config.get("text_vocab_size"):  # a caption model: the label cycle indexes prompts
        if config.labels is not None:
            raise ValueError(f"the RQ-Transformer at {ar_uri} is text-conditioned: give "
                             f"prompts, not labels")  # fmt: skip
        if not prompts:  # none asked for: captions of the run's own val split
            prompts = default_prompts(storage, out.of("encode"))
            print(f"sample: no prompts given: {len(prompts)} captions of the run's val split "
                  f"(set sample.prompts or prompts_file to choose)")  # fmt: skip
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
    if (finished := out.begin(planned, overwrite, config)) is not None:
        return finished

    n, size = config.num_samples, config.chunk_size
    labels: list[int | None] = [cycle[i % len(cycle)] for i in range(n)] if cycle else [None] * n
    chunks = [(c, c * size, min(n, (c + 1) * size)) for c in range(math.ceil(n / size))]
    listed = out.finished_files("codes")  # one listing: the chunks a killed run finished
    results = {c: {"name": f"chunk-{c:05d}.parquet", "rows": end - first,
                   "bytes": listed[f"chunk-{c:05d}.parquet"]}
               for c, first, end in chunks if f"chunk-{c:05d}.parquet" in listed}  # fmt: skip
    pending = [chunk for chunk in chunks if chunk[0] not in results]
    progress = Progress("sample", len(pending), sum(end - first for _, first, end in pending),
                        "samples")  # fmt: skip

    def sample(actor: Any, chunk: tuple[int, int, int]) -> Any:
        c, first, end = chunk
        chunk_labels = labels[first:end] if cycle and tokens is None else None
        chunk_prompts = [(prompts[i], tokens[i].tolist()) for i in labels[first:end]] \
            if tokens is not None else None  # fmt: skip
        return actor.sample.remote(c, first, chunk_labels, end - first, config, out.uri, vae_fp,
                                   planned.fingerprint, chunk_prompts)  # fmt: skip

    def done(result: dict[str, Any]) -> None:
        results[result["chunk"]] = result
        progress.update(result["rows"])

    sampling_started = time.time()
    with ActorPool(ChunkSampler, config, len(pending), ar_uri, vae_uri, config.storage,
                   config.use_gpu, rejection) as pool:  # fmt: skip
        print(f"sample: {n} samples in {len(chunks)} chunks ({len(results)} already done) with "
              f"{len(pool)} actor(s) -> {out.uri}")  # fmt: skip
        pool.run(pending, sample, 2, done)
        actors = len(pool)
    seconds = time.time() - sampling_started

    label_names = {index: name for name, index in names.items()}
    grids = write_grids(storage, out.uri, labels, label_names, config.grid_size,
                        prompts if tokens is not None else None)  # fmt: skip
    sampled = sum(results[c].get("rows", 0) for c in results if "seconds" in results[c])
    report = {"samples": n, "sampled_now": sampled, "seconds": round(seconds, 3),
              "samples_per_s": round(sampled / seconds, 3) if sampled else None,
              "actors": actors, "grids": grids, "acceptance_rate": config.acceptance_rate,
              "candidates": sum(r.get("candidates", 0) for r in results.values())}  # fmt: skip
    storage.write_bytes(out.path("sampling.json"), json.dumps(report, indent=2).encode())
    planned.units = [{k: results[c][k] for k in ("name", "rows", "bytes")} for c, _, _ in chunks]
    planned.counts = {"samples": n, "chunks": len(chunks)}
    if cycle and tokens is None:  # a class model: the classes sampled (evaluate's FID per class)
        planned.properties = {"labels": sorted(set(cycle))}
    out.finish(planned)
    rate = f", {report['samples_per_s']} samples/s" if sampled else ""
    shown = ", ".join(grids) if len(grids) <= 4 else f"{len(grids)} in {out.uri}"
    print(f"sample: {n} images in {time.time() - started:.1f} s{rate}; grids: {shown}")
    return planned
