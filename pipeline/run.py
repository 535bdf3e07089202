"""`rqpipe run`: shard -> train-vae -> encode -> train-ar -> sample -> evaluate, in order, on
one run dir (evaluate unless `evaluate.enabled: false`).

Each stage follows the idempotency protocol itself (pipeline/manifest.py), so the orchestrator
only runs them in order and reports what each one did: `up to date` (its manifest already had
this fingerprint), `resumed` (unfinished output was there and was kept), or `ran`. A failed
stage stops the run; re-running the same command picks up where it stopped.

Overrides address one stage with its config section (`train_vae.steps=100`); a `storage.`
override (e.g. `storage.endpoint_url=...`) applies to every stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.core.config import ConfigError, load_config
from pipeline.core.manifest import Manifest, read_manifest
from pipeline.core.storage import Storage, join


@dataclass
class Stage:
    name: str
    directory: str  # under the run dir
    load: Callable[[], tuple[type, Callable[..., Manifest]]]  # late imports: torch is slow


def _shard() -> tuple[type, Callable[..., Manifest]]:
    from pipeline.stages.shard import ShardConfig, run_shard_stage

    return ShardConfig, run_shard_stage


def _train_vae() -> tuple[type, Callable[..., Manifest]]:
    from pipeline.stages.train_vae import TrainVAEConfig, run_train_vae_stage

    return TrainVAEConfig, run_train_vae_stage


def _encode() -> tuple[type, Callable[..., Manifest]]:
    from pipeline.stages.encode import EncodeConfig, run_encode_stage

    return EncodeConfig, run_encode_stage


def _train_ar() -> tuple[type, Callable[..., Manifest]]:
    from pipeline.stages.train_ar import TrainARConfig, run_train_ar_stage

    return TrainARConfig, run_train_ar_stage


def _sample() -> tuple[type, Callable[..., Manifest]]:
    from pipeline.stages.sample import SampleConfig, run_sample_stage

    return SampleConfig, run_sample_stage


def _evaluate() -> tuple[type, Callable[..., Manifest]]:
    from pipeline.stages.evaluate import EvaluateConfig, run_evaluate_stage

    return EvaluateConfig, run_evaluate_stage


STAGES = (
    Stage("shard", "shards", _shard),
    Stage("train-vae", "vae", _train_vae),
    Stage("encode", "codes", _encode),
    Stage("train-ar", "ar", _train_ar),
    Stage("sample", "samples", _sample),
    Stage("evaluate", "eval", _evaluate),
)


def stage(name: str) -> Stage:
    for candidate in STAGES:
        if candidate.name == name:
            return candidate
    raise KeyError(f"unknown stage {name!r}; stages: {[s.name for s in STAGES]}")


def stage_overrides(section: str, overrides: list[str]) -> list[str]:
    """The overrides for one stage's config: its `section.` ones and the shared `storage.`
    ones, with the section prefix removed."""
    sections = {"storage"} | {s.load()[0].section for s in STAGES}
    picked = []
    for item in overrides:
        key = item.split("=", 1)[0]
        head = key.split(".", 1)[0]
        if "=" not in item or "." not in key or head not in sections:
            raise ConfigError(f"override {item!r}: in `rqpipe run`, prefix the key with its "
                              f"stage section ({', '.join(sorted(sections))}), e.g. "
                              f"train_vae.steps=100")  # fmt: skip
        if head == section:
            picked.append(item.split(".", 1)[1])
        elif head == "storage":
            picked.append(item)
    return picked


def _summary(manifest: Manifest) -> str:
    counts = manifest.counts
    shown = [f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in counts.items()]
    return ", ".join(shown)


def _has_output(storage: Storage, directory: str) -> bool:
    """Unfinished output is there (a lease left by a refused or killed run is not output)."""
    return any(not uri.endswith("/_lease.json") for uri, _ in storage.list_files(directory))


@dataclass
class PlannedStage:
    stage: Stage
    config: Any
    run: Callable[..., Manifest]


def plan_pipeline(config_path: str | None = None, overrides: list[str] = (),
                  input_uri: str | None = None) -> list[PlannedStage]:  # fmt: skip
    """Every stage's config, loaded and checked before anything starts (Ray included): the
    input (when given) and every file a stage will need (weights, models it reads) exist."""
    planned = []
    for s in STAGES:
        config_class, run_stage = s.load()
        section_overrides = stage_overrides(config_class.section, overrides)
        config = load_config(config_class, config_path, section_overrides)
        if getattr(config, "enabled", True):  # a stage that can be turned off (evaluate)
            planned.append(PlannedStage(s, config, run_stage))
    for p in planned:  # the files each stage will need, before any stage starts
        if hasattr(p.config, "preflight"):
            p.config.preflight()
    if input_uri is not None and not Storage(planned[0].config.storage).list_files(input_uri):
        raise FileNotFoundError(f"--input {input_uri}: nothing there (a folder of images, a "
                                f"CSV/Parquet listing or WebDataset tars)")  # fmt: skip
    return planned


def run_pipeline(
    input_uri: str, run_dir: str, plan: list[PlannedStage], overwrite: bool = False
) -> list[dict[str, Any]]:
    """Run the planned stages in order; returns one record per stage:
    {"stage", "status" (ran / resumed / extended / up to date), "seconds", "counts"}."""
    records = []
    for index, planned in enumerate(plan, start=1):
        s, config = planned.stage, planned.config
        storage = Storage(config.storage)
        directory = join(run_dir, s.directory)
        before = read_manifest(storage, directory)
        partial = before is None and _has_output(storage, directory)
        print(f"[{index}/{len(plan)}] {s.name}", flush=True)
        started = time.time()
        if s.name == "shard":
            manifest = planned.run(input_uri, run_dir, config, overwrite=overwrite)
        else:
            manifest = planned.run(run_dir, config, overwrite=overwrite)
        seconds = time.time() - started
        if before is not None and before.fingerprint == manifest.fingerprint:
            status = "up to date"
        elif before is not None and not overwrite:  # a finished training stage, more steps
            status = "extended"
        else:
            status = "resumed" if partial else "ran"
        records.append({"stage": s.name, "status": status, "seconds": round(seconds, 1),
                        "counts": manifest.counts})  # fmt: skip
        print(f"rqpipe run: {s.name:<9} {status:<10} {_summary(manifest):<48} {seconds:7.1f} s",
              flush=True)  # fmt: skip
    return records
