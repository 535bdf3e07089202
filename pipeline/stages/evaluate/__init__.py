"""The evaluate stage: how good a run is, measured as the paper does, in RUN/eval/.

- Reference statistics: feature vectors of the real images of a split (`reference: train|val`),
  shard by shard, by a pool of Ray actors (GPU when asked), reduced to a mean and covariance
  (RUN/eval/reference.npz); or a user's .npz with `mu` and `sigma` (e.g. ADM's ImageNet 256
  reference batch).
- The RQ-VAE on the val split: rFID, PSNR, SSIM, LPIPS (with `lpips_weights`), and PSNR from
  the first d codes for d = 1..D.
- The samples of RUN/samples: FID against the reference, Inception Score, precision and recall,
  and FID per class for a class-conditional run.

Features come from the FID Inception network (model/evaluation/inception.py; its weights from
`weights` or torch hub's cache) or, with `features: classifier`, from a small classifier
model folder (the demo's): then every Fréchet distance is called "demo FID".

Work units: one per shard and one per sample chunk, `units/{name}.npz` then `units/{name}.json`,
which records the stage fingerprint: a killed run redoes only unfinished units, a re-run with
the same config is a no-op. RUN/eval/: metrics.json, report.md, psnr-per-depth.png,
reference.npz, units/, config.yaml, _manifest.json.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.core.actor_pool import POOL_FIELDS, ActorPool, ActorPoolConfig
from pipeline.core.config import output_fields
from pipeline.core.lease import single_writer
from pipeline.core.manifest import Manifest, read_manifest, require_manifest, vae_fingerprint
from pipeline.core.progress import Progress
from pipeline.core.stage_folder import StageFolder
from pipeline.core.storage import (
    Storage,
    StorageConfig,
    absolute,
    join,
    model_location,
    read_model_config,
)
from pipeline.formats.shard_tar import decode_shard
from pipeline.stages.evaluate.features import FeatureWorker, UnitPlan, extractor_identity
from pipeline.stages.evaluate.report import (
    metric_names,
    reconstruction_metrics,
    reduce_units,
    reference_statistics,
    sample_metrics,
    write_report,
)

FORMAT_VERSION = 1
FEATURE_KINDS = ("inception", "classifier")


@dataclass
class EvaluateConfig(ActorPoolConfig):
    section: ClassVar[str] = "evaluate"
    execution_fields: ClassVar[tuple[str, ...]] = (
        *POOL_FIELDS,
        "enabled", "vae", "samples_dir", "batch_size", "decode_cpus", "storage",
        "weights", "lpips_weights", "clip",  # fingerprinted as the hashes of what they hold
    )  # fmt: skip

    enabled: bool = True  # run as the last stage of `rqpipe run`
    features: str = "inception"  # inception | classifier (a model/evaluation/classifier.py folder)
    weights: str | None = (
        None  # inception: the .pth (default: torch hub's cache); classifier: its folder
    )
    reference: str = "train"  # train | val | a .npz with mu and sigma
    reconstructions: bool = True  # the RQ-VAE's metrics on the val split
    samples: bool = True  # the metrics of the sample stage's images
    lpips_weights: str | None = None  # LPIPS of reconstructions (rqpipe convert-lpips)
    clip: str | None = None  # a CLIP folder (transformers layout): the CLIP score of prompts
    precision_recall_k: int = 3
    # Precision and recall compare seeded samples of at most this many features a side (each
    # unit keeps its share; both sides cut to the smaller): bounded, whatever the run's size.
    pr_sample: int = 10_000
    is_splits: int = 10
    per_class: int = 16  # FID per class for the first N sampled classes; 0: none
    vae: str | None = None  # RQ-VAE folder; default RUN/vae/model
    samples_dir: str | None = None  # default RUN/samples
    batch_size: int = 64
    decode_cpus: float = 0.5
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.features not in FEATURE_KINDS:
            raise ValueError(f"evaluate.features must be one of {FEATURE_KINDS}, got "
                             f"{self.features!r}")  # fmt: skip
        if self.enabled and self.features == "classifier" and not self.weights:
            raise ValueError("evaluate.features=classifier needs weights=FOLDER (a model/"
                             "evaluation/classifier.py model folder; `rqpipe demo` trains one into "
                             "RUN/demo-classifier), or set evaluate.enabled=false")  # fmt: skip
        for name in ("batch_size", "precision_recall_k", "is_splits", "pr_sample"):
            if getattr(self, name) < 1:
                raise ValueError(f"evaluate.{name} must be >= 1, got {getattr(self, name)}")

    def preflight(self) -> None:
        """The weights this stage will read, checked before any stage of a run starts."""
        if not self.enabled:
            return
        if self.features == "inception":
            from model.evaluation.inception import find_inception_weights

            find_inception_weights(self.weights)
        elif not Storage(self.storage).exists(join(self.weights, "config.json")):
            raise FileNotFoundError(f"evaluate.weights {self.weights}: no classifier model "
                                    f"folder there (config.json)")  # fmt: skip
        if self.lpips_weights and not Storage(self.storage).exists(self.lpips_weights):
            raise FileNotFoundError(f"evaluate.lpips_weights {self.lpips_weights}: no file")
        if self.clip and not Storage(self.storage).exists(join(self.clip, "config.json")):
            raise FileNotFoundError(f"evaluate.clip {self.clip}: not a CLIP folder (config.json,"
                                    f" model.safetensors, tokenizer files)")  # fmt: skip


def _plan_units(storage: Storage, config: EvaluateConfig, shards: Manifest,
                samples: Manifest | None) -> list[tuple[str, str, bool]]:  # fmt: skip
    """(unit name, kind 'shard'|'sample', with reconstructions) for everything to extract."""
    splits = {config.reference} & {"train", "val"}
    if config.reconstructions:
        splits.add("val")
    units = []
    for unit in shards.units:
        name = unit["name"].removesuffix(".tar")
        split = name.split("-", 1)[0]
        if split in splits:
            units.append((name, "shard", config.reconstructions and split == "val"))
    for unit in samples.units if samples is not None else []:
        units.append((f"samples-{unit['name'].removesuffix('.parquet')}", "sample", False))
    return units


def _unit_plans(config: EvaluateConfig, units: list[tuple[str, str, bool]], rows: dict[str, int],
                samples: Manifest | None) -> dict[str, UnitPlan]:  # fmt: skip
    """Each unit's share of the precision/recall sample, the classes whose rows it keeps
    (FID per class of the first `per_class` sampled classes), and a sample chunk's place
    among the samples (the Inception Score's splits)."""
    reference = [
        n for n, kind, _ in units if kind == "shard" and n.startswith(f"{config.reference}-")
    ]
    sampled = [n for n, kind, _ in units if kind == "sample"]
    totals = {
        "reference": sum(rows[n] for n in reference),
        "samples": sum(rows[n] for n in sampled),
    }
    size = min([config.pr_sample, *(t for t in totals.values() if t)])
    labels = (samples.properties.get("labels") or []) if samples is not None else []
    classes = sorted(labels)[: config.per_class]
    plans = {n: UnitPlan(round(size * rows[n] / totals["reference"]), classes) for n in reference}
    plans.update({n: UnitPlan(0, []) for n, kind, _ in units if kind == "shard" and n not in plans})
    first, splits = 0, max(1, min(config.is_splits, totals["samples"]))
    for name in sampled:
        plans[name] = UnitPlan(round(size * rows[name] / totals["samples"]), classes, first,
                               totals["samples"], splits)  # fmt: skip
        first += rows[name]
    return plans


def _digest(storage: Storage, uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:32]


@single_writer("evaluate")
def run_evaluate_stage(run_dir: str, config: EvaluateConfig, overwrite: bool = False) -> Manifest:
    import ray

    started = time.time()
    evaluation = StageFolder(run_dir, "evaluate", config.storage)
    storage, run_dir, units_dir = evaluation.storage, evaluation.run_dir, evaluation.path("units")
    shards = evaluation.upstream("shard")
    vae_uri, vae_files = model_location(config.vae or evaluation.run_path("vae", "model"))
    vae_config = read_model_config(storage, vae_files, "RQ-VAE",
                                   "run train-vae first or pass vae=URI")  # fmt: skip
    samples_dir = absolute(config.samples_dir or evaluation.of("sample").uri)
    samples = require_manifest(storage, samples_dir, "sample") if config.samples else None
    weights = absolute(config.weights) if config.weights else None
    upstream = {"shard": shards.fingerprint, "vae": vae_fingerprint(storage, vae_files),
                "features": extractor_identity(storage, config.features, weights)}  # fmt: skip
    if samples is not None:
        upstream["sample"] = samples.fingerprint
    if config.reference not in ("train", "val"):
        if not storage.exists(config.reference):
            raise FileNotFoundError(f"evaluate.reference {config.reference}: no such file (give "
                                    f"train, val or a .npz with mu and sigma)")  # fmt: skip
        upstream["reference"] = _digest(storage, config.reference)
    if config.lpips_weights:
        upstream["lpips"] = _digest(storage, config.lpips_weights)
    clip = absolute(config.clip) if config.clip else None
    if clip is not None:
        upstream["clip"] = _digest(storage, join(clip, "model.safetensors"))
    planned = Manifest("evaluate", FORMAT_VERSION, output_fields(config), upstream)
    if (finished := evaluation.begin(planned, overwrite, config)) is not None:
        return finished

    fp = planned.fingerprint
    units = _plan_units(storage, config, shards, samples)
    if not any(kind == "shard" for _, kind, _ in units) and config.reference in ("train", "val"):
        raise ValueError(f"evaluate: the run has no {config.reference} shards to take the "
                         f"reference statistics from")  # fmt: skip
    rows = {u["name"].removesuffix(".tar"): int(u["rows"]) for u in shards.units}
    if samples is not None:
        rows.update({f"samples-{u['name'].removesuffix('.parquet')}": int(u["rows"])
                     for u in samples.units})  # fmt: skip
    listed = evaluation.finished_files("units")  # one listing: the units a killed run finished
    done = {n: ({"name": n, "rows": rows[n]} if f"{n}.json" in listed else None)
            for n, _, _ in units}  # fmt: skip
    pending = [u for u in units if done[u[0]] is None]
    print(f"evaluate: {len(units)} units ({len(units) - len(pending)} already done) with "
          f"{config.features} features, {config.num_actors} actor(s) -> {evaluation.uri}")  # fmt: skip
    if pending:
        resolution = vae_config["resolution"]
        with_vae = any(recon for _, _, recon in pending)
        decode = ray.remote(decode_shard).options(num_cpus=config.decode_cpus,
                                                  max_retries=config.max_retries)  # fmt: skip
        progress = Progress("evaluate", len(pending), sum(rows[n] for n, _, _ in pending))

        plans = _unit_plans(config, units, rows, samples)

        def extract(actor: Any, unit: tuple[str, str, bool]) -> Any:
            name, kind, recon = unit
            if kind == "shard":
                decoded = decode.remote(evaluation.of("shard").path(f"{name}.tar"), resolution,
                                        config.storage)  # fmt: skip
                return actor.shard_unit.remote(name, decoded, units_dir, recon, fp, plans[name])
            table = f"{name.removeprefix('samples-')}.parquet"
            return actor.sample_unit.remote(name, samples_dir, table, units_dir, fp, plans[name])

        def finished(result: dict[str, Any]) -> None:
            done[result["name"]] = result
            progress.update(result["rows"])

        with ActorPool(FeatureWorker, config, len(pending), config.features, weights,
                       vae_uri if with_vae else None, config.lpips_weights, config.storage,
                       config.use_gpu, config.batch_size, clip) as pool:  # fmt: skip
            pool.run(pending, extract, 2, finished)

    metrics = _metrics(storage, run_dir, evaluation.uri, config, units, weights, upstream)
    storage.write_bytes(evaluation.path("metrics.json"), json.dumps(metrics, indent=2).encode())
    written = write_report(storage, evaluation.uri, metrics)
    planned.units = [{"name": f"units/{n}.npz", "rows": done[n]["rows"]} for n, _, _ in units]
    planned.counts = {"units": len(units), "reference_images": metrics["reference"]["images"] or 0}
    for part in ("vae", "samples"):
        if part in metrics:
            planned.counts[f"{part}_images"] = metrics[part]["images"]
    evaluation.finish(planned)
    _print_summary(metrics, time.time() - started, [evaluation.path("metrics.json"),
                                                    *(evaluation.path(w) for w in written)])  # fmt: skip
    return planned


def _metrics(storage: Storage, run_dir: str, eval_dir: str, config: EvaluateConfig,
             units: list[tuple[str, str, bool]], weights: str | None,
             upstream: dict[str, str]) -> dict:  # fmt: skip
    names = metric_names(config.features)
    units_dir = join(eval_dir, "units")
    shard_units = [n for n, kind, _ in units if kind == "shard"]
    sums = {split: reduce_units(storage, units_dir, [n for n in shard_units
                                                     if n.startswith(f"{split}-")])
            for split in ("train", "val")}  # fmt: skip
    reference = reference_statistics(storage, eval_dir, config.reference,
                                     sums.get(config.reference, {}))  # fmt: skip
    metrics = {"run_dir": run_dir,
               "features": {"kind": config.features, "identity": upstream["features"],
                            "weights": weights},
               "reference": {"source": reference["source"], "images": reference["count"]}}  # fmt: skip
    if config.reconstructions and "recon_count" in sums["val"]:
        metrics["vae"] = reconstruction_metrics(sums["val"], names)
    sample_units = [n for n, kind, _ in units if kind == "sample"]
    if sample_units:
        metrics["samples"] = sample_metrics(reduce_units(storage, units_dir, sample_units),
                                            reference, names, config.precision_recall_k)  # fmt: skip
    return metrics


def _print_summary(metrics: dict, seconds: float, files: list[str]) -> None:
    names = metric_names(metrics["features"]["kind"])
    parts = []
    if "vae" in metrics:
        vae = metrics["vae"]
        parts.append(f"RQ-VAE ({vae['images']} val images): {names['rFID']} "
                     f"{vae[names['rfid']]:.2f}, PSNR {vae['psnr']:.2f} dB, SSIM {vae['ssim']:.3f}")  # fmt: skip
    if "samples" in metrics:
        s = metrics["samples"]
        pr = s["precision_recall"]
        parts.append(f"samples ({s['images']}): {names['FID']} {s[names['fid']]:.2f}, "
                     f"{names['IS']} {s[names['is']]['mean']:.2f}"
                     + (f", precision {pr['precision']:.2f}, recall {pr['recall']:.2f}"
                        if isinstance(pr, dict) else ""))  # fmt: skip
    print(
        f"evaluate: {'; '.join(parts) or 'nothing to measure'} ({seconds:.1f} s) -> "
        f"{', '.join(files)}"
    )


def last_metrics(storage: Storage, run_dir: str) -> dict | None:
    """RUN/eval/metrics.json of a finished evaluate stage, or None."""
    if read_manifest(storage, join(run_dir, "eval")) is None:
        return None
    return json.loads(storage.read_bytes(join(run_dir, "eval", "metrics.json")))
