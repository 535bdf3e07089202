"""The train-ar stage: the RQ-Transformer trained on RUN/codes/ with Ray Train, written to RUN/ar/.

This module holds the config and the driver; `data.py` the tables, captions and codebook;
`worker.py` the Ray Train loop.

Data: Ray Data streams the code tables (`train-*.parquet`; `val-*` rows score the validation
loss) to the workers through `get_dataset_shard`. The frozen code embeddings are the codebook
of the RQ-VAE that made the tables: the tables record its fingerprint, and a different VAE is
refused. `conditioning: auto` (the default) fits the model to the data: captions give a
caption-conditioned model, labels a class-conditional one, neither an unconditional one; the
resolved choice is what is fingerprinted and saved. Labels make the model class-conditional
(with label dropout, for classifier-free guidance). A caption model (`text`; the paper's CC-3M
setup, model/text.py): a BPE tokenizer is
trained on the train tables' captions (or `text.tokenizer` is used), written to
RUN/ar/tokenizer.json and RUN/ar/model/tokenizer.json, and its hash is part of the fingerprint;
captions are tokenized with BPE dropout in the data pipeline, dropped to the empty caption with
`text.caption_dropout` (guidance), and the loss is (1 - w) image + w caption, w = 0.1.

Targets: `hard` trains on the stored codes. `soft` follows the paper's stochastic codes: from
each image's stored latents (encode with_latents=true) the codes are re-sampled every step
from q_d = softmax(-||r_{d-1} - e_k||^2 / soft_temperature), and q_d is the target.

RUN/ar/ holds Ray Train's run (checkpoints), `metrics.jsonl` (loss overall and per depth,
validation loss, tokens/s and model TFLOP/s per worker; object stores: `metrics/part-*.jsonl`),
`curves.png`, `samples.png` (a row of samples per class, or per val caption, at each
checkpoint, decoded with the VAE; `samples.txt` names a caption model's rows), `config.yaml`,
and at the end `model/` (safetensors + config.json, + tokenizer.json) and `_manifest.json`.
Resume, extension and `init_from` work as in train-vae. `strategy: fsdp` shards the parameters,
gradients and Adam state over the workers (pipeline/core/fsdp.py: the billion-parameter presets);
its checkpoints are sharded, and a run may change `strategy` when it resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from model.rqtransformer import RQTransformerConfig
from model.text import TextConfig, check_tokenizer
from model.training import soft_quantizer, soft_target_sharpness
from pipeline.core.config import output_fields
from pipeline.core.lease import single_writer
from pipeline.core.manifest import Manifest
from pipeline.core.stage_folder import StageFolder
from pipeline.core.storage import (
    Storage,
    StorageConfig,
    absolute,
    model_location,
    require_model_folders,
)
from pipeline.core.train_driver import (
    RESUMABLE_FIELDS,
    TRAINER_FIELDS,
    TrainerConfig,
    add_init_from,
    check_init_from,
    check_one_batch,
    finish_training,
    fit,
)
from pipeline.formats.codes_table import code_tables
from pipeline.stages.train_ar.data import (
    caption_tokenizer,
    load_code_embeddings,
    preview_prompts,
    train_dataset,
    validation_rows,
)
from pipeline.stages.train_ar.worker import SamplePreview, train_ar_worker

__all__ = ["SamplePreview", "TrainARConfig", "run_train_ar_stage", "train_dataset",
           "validation_rows"]  # fmt: skip

FORMAT_VERSION = 1
TARGETS = ("hard", "soft")
# auto: captions give a text model, labels a class model, neither an unconditional one
CONDITIONINGS = ("auto", "text", "class", "none")
STRATEGIES = ("ddp", "fsdp")
# set by the tables (and the tokenizer), not the user
DATA_FIELDS = ("code_shape", "codebook_size", "num_classes", "text_vocab_size", "text_length")


@dataclass
class TrainARConfig(TrainerConfig):
    section: ClassVar[str] = "train_ar"
    execution_fields: ClassVar[tuple[str, ...]] = (
        *TRAINER_FIELDS, "vae", "strategy", "val_rows", "preview_per_class", "storage",
        "init_from",  # fingerprinted as the model's own fingerprint (upstream "init_from")
    )  # fmt: skip

    model_preset: str = "tiny"  # an RQTransformerConfig preset ...
    model: dict[str, Any] = field(default_factory=dict)  # ... and field overrides on top of it
    init_from: str | None = None  # an exported RQ-Transformer (model folder) to fine-tune from
    conditioning: str = "auto"  # auto | text (captions) | class (labels) | none (unconditional)
    text: TextConfig = field(default_factory=TextConfig)  # the captions, when "text"
    targets: str = "hard"  # or "soft": stochastic codes from the tables' latents column
    soft_temperature: float = 0.5  # the paper's value
    steps: int = 2000
    batch_size: int = 64  # per worker
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-4  # matrices only (the official value); not embeddings, norms, biases
    warmup_steps: int = 100
    grad_clip: float = 1.0
    shuffle_buffer: int = 4096  # rows; tables come in a new order each epoch (shuffled_batches)
    seed: int = 0
    grad_accum_steps: int = 1
    strategy: str = "ddp"  # or "fsdp": parameters, gradients and Adam state sharded (core/fsdp.py)
    vae: str | None = None  # the RQ-VAE whose codebook the tables use; default RUN/vae/model
    val_rows: int = 256
    preview_per_class: int = 8  # samples per class in samples.png at each checkpoint; 0: none
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets not in TARGETS:
            raise ValueError(f"targets={self.targets!r}: use one of {list(TARGETS)}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning={self.conditioning!r}: use one of "
                             f"{list(CONDITIONINGS)}")  # fmt: skip
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: use one of {list(STRATEGIES)}")
        if self.soft_temperature <= 0:
            raise ValueError(f"soft_temperature must be > 0, got {self.soft_temperature}")
        fixed = sorted(set(self.model) & set(DATA_FIELDS))
        if fixed:
            raise ValueError(f"model.{fixed[0]} comes from the code tables and cannot be set")
        self.model_config([1, 1, 1], 2, 0)  # unknown presets or keys fail at load time

    def resolve_conditioning(self, labels: bool, captions: bool, where: str) -> str:
        """What the model is conditioned on, given whether the data has labels and captions:
        `auto` picks captions, then labels, then nothing; an explicit choice the data cannot
        serve is refused here, before anything trains."""
        if self.conditioning == "auto":
            return "text" if captions else "class" if labels else "none"
        if self.conditioning == "text" and not captions:
            raise ValueError(f"train_ar.conditioning=text needs captions, and {where} has none: "
                             f"give a CSV/Parquet listing with a caption column (or WebDataset "
                             f"tars with captions), or set train_ar.conditioning=auto")  # fmt: skip
        if self.conditioning == "class" and not labels:
            raise ValueError(f"train_ar.conditioning=class needs labels, and {where} has none: "
                             f"give class sub-folders or a listing with a label column, or set "
                             f"train_ar.conditioning=auto")  # fmt: skip
        return self.conditioning

    def preflight(self) -> None:
        """The models this stage will read, checked before any stage of a run starts."""
        require_model_folders(Storage(self.storage), self.section, vae=self.vae,
                              init_from=self.init_from)  # fmt: skip
        self.tracking.preflight()

    def model_config(self, code_shape: list[int], codebook_size: int, num_classes: int,
                     text_vocab_size: int = 0) -> RQTransformerConfig:  # fmt: skip
        data = dict(code_shape=code_shape, codebook_size=codebook_size, num_classes=num_classes,
                    text_vocab_size=text_vocab_size,
                    text_length=self.text.context_length if text_vocab_size else 0)  # fmt: skip
        return RQTransformerConfig.preset(self.model_preset, **{**self.model, **data})


@single_writer("train-ar")
def run_train_ar_stage(run_dir: str, config: TrainARConfig, overwrite: bool = False) -> Manifest:
    started = time.time()
    config.preflight()
    ar = StageFolder(run_dir, "train-ar", config.storage)
    storage, codes_dir = ar.storage, ar.of("encode").uri
    encoded = ar.upstream("encode")
    # From the encode manifest: nothing is read of the tables before the stage knows it runs
    tables = code_tables(storage, codes_dir, encoded.units, encoded.properties)
    check_one_batch("train-ar", tables.train_images, config)
    upstream = {"encode": encoded.fingerprint}
    # resolved before the fingerprint: `auto` on captioned tables trains what `text` would
    config.conditioning = config.resolve_conditioning(tables.num_classes > 0,
                                                      tables.captioned > 0, codes_dir)  # fmt: skip
    if config.conditioning == "text" and config.text.tokenizer:  # a trained one follows from
        tokenizer_file = storage.read_bytes(absolute(config.text.tokenizer))  # the upstream
        upstream["tokenizer"] = hashlib.sha256(tokenizer_file).hexdigest()[:32]
    add_init_from(ar, config, upstream)
    planned = Manifest("train-ar", FORMAT_VERSION, output_fields(config), upstream)
    if config.targets == "soft" and not tables.has_latents:
        raise ValueError(f"targets=soft needs the latents column in {codes_dir}: re-run encode "
                         f"with with_latents=true (and --overwrite), or use targets=hard")  # fmt: skip
    if (finished := ar.begin(planned, overwrite, resumable=RESUMABLE_FIELDS)) is not None:
        return finished

    tokenizer_json, text_vocab_size = None, 0
    if config.conditioning == "text":  # trained on a bounded caption sample, after begin
        tokenizer_json = caption_tokenizer(storage, config, tables)
        text_vocab_size = check_tokenizer(tokenizer_json)
    num_classes = tables.num_classes if config.conditioning == "class" else 0
    model_config = config.model_config(tables.code_shape, tables.codebook_size, num_classes,
                                       text_vocab_size)  # fmt: skip
    check_init_from(ar, config, model_config)
    ar.save_config(config, model=dataclasses.asdict(model_config))
    vae_uri, vae_files = model_location(config.vae or ar.run_path("vae", "model"))
    code_embeddings = load_code_embeddings(storage, vae_files, tables)
    columns = ["codes", "label"] + (["latents"] if config.targets == "soft" else [])
    text = prompts = None
    if tokenizer_json:
        storage.write_bytes(ar.path("tokenizer.json"), tokenizer_json.encode())
        columns.append("caption")
        text = {"tokenizer_json": tokenizer_json, "context_length": config.text.context_length}
        prompts = preview_prompts(storage, tables, text, config.preview_per_class, ar.uri)
    loop_config = {
        "config": config,
        "model_config": model_config,
        "run_dir": ar.run_dir,
        "vae_uri": vae_uri,
        "code_embeddings": code_embeddings,
        "val": validation_rows(storage, tables, config.val_rows, columns, text),
        "tokenizer_json": tokenizer_json,
        "preview_prompts": prompts,
        "views": tables.views,
    }
    if config.targets == "soft":
        check_soft_targets(config, code_embeddings, loop_config["val"]["latents"],
                           model_config.depth)  # fmt: skip
    train_text = text and {**text, "bpe_dropout": config.text.bpe_dropout}
    dataset = train_dataset(storage, tables, columns, config.seed, train_text)
    kind = f"{num_classes} classes" if num_classes else "unconditional"
    if tokenizer_json:
        kind = f"captions of {config.text.context_length} tokens, vocabulary {text_vocab_size}"
    views = f", {tables.views} views an image" if tables.views > 1 else ""
    print(f"train-ar: {config.steps} steps on {config.workers_text()}, {tables.rows:,} "
          f"code stacks {tables.code_shape} (K={tables.codebook_size}, {kind}, "
          f"{config.targets} targets{views}), writing {ar.uri}", flush=True)  # fmt: skip
    fit(ar, train_ar_worker, loop_config, config, dataset)
    counts = {"num_classes": num_classes, "train_rows": tables.rows}
    if tokenizer_json:
        counts["text_vocab_size"] = text_vocab_size
    return finish_training(ar, planned, config, started, **counts)


def check_soft_targets(config: TrainARConfig, code_embeddings: Any, latents: Any,
                       depth: int) -> None:  # fmt: skip
    """Print how sharp the soft targets are on the validation latents; warn when they are
    close to uniform (a temperature too high for this VAE's latent scale)."""
    quantizer = soft_quantizer(torch.as_tensor(code_embeddings), depth)
    sharp = soft_target_sharpness(quantizer, torch.as_tensor(latents), config.soft_temperature,
                                  config.seed)  # fmt: skip
    print(f"train-ar: soft targets at soft_temperature={config.soft_temperature}: entropy "
          f"{sharp['entropy']} nats a depth (uniform {sharp['uniform_entropy']}); the sampled "
          f"code is the nearest {[f'{v:.0%}' for v in sharp['nearest_fraction']]} of the time",
          flush=True)  # fmt: skip
    if sharp["entropy"][0] > 0.5 * sharp["uniform_entropy"]:
        warnings.warn(f"soft targets at soft_temperature={config.soft_temperature} are close to "
                      f"uniform on this VAE's latents (depth-1 entropy {sharp['entropy'][0]} of "
                      f"{sharp['uniform_entropy']} nats): the temperature divides squared "
                      f"distances, and the paper's 0.5 suits its VAE's latent scale, not this "
                      f"one. Lower soft_temperature or use targets=hard", stacklevel=2)  # fmt: skip
