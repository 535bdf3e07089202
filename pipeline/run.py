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

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.core.config import ConfigError, load_config
from pipeline.core.manifest import Manifest, read_manifest
from pipeline.core.stage_folder import FOLDERS
from pipeline.core.storage import Storage, absolute, join
from pipeline.formats.inputs import InputDescription, describe_input


@dataclass
class Stage:
    name: str
    module: str  # pipeline.stages.<module>: its config class and its run_*_stage function
    config_class: str

    @property
    def directory(self) -> str:  # under the run dir
        return FOLDERS[self.name]

    def load(self) -> tuple[type, Callable[..., Manifest]]:
        """(config class, stage function), imported late: torch is slow to import."""
        module = importlib.import_module(f"pipeline.stages.{self.module}")
        return getattr(module, self.config_class), getattr(module, f"run_{self.module}_stage")


STAGES = (
    Stage("shard", "shard", "ShardConfig"),
    Stage("train-vae", "train_vae", "TrainVAEConfig"),
    Stage("encode", "encode", "EncodeConfig"),
    Stage("train-ar", "train_ar", "TrainARConfig"),
    Stage("sample", "sample", "SampleConfig"),
    Stage("evaluate", "evaluate", "EvaluateConfig"),
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
    counts = dict(manifest.counts)
    if "workers" in counts:  # a training stage's sizes, [[from step, workers], ...]
        sizes = counts["workers"]
        counts["workers"] = " -> ".join(
            f"{n}" if i == 0 else f"{n} (step {step})" for i, (step, n) in enumerate(sizes)
        )  # e.g. "1 -> 2 (step 40) -> 1 (step 44)"
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


def load_stage_configs(config_path: str | None = None, overrides: list[str] = ()
                       ) -> list[PlannedStage]:  # fmt: skip
    """Every enabled stage's config: a mistyped key or a bad value is refused here, at once."""
    planned = []
    for s in STAGES:
        config_class, run_stage = s.load()
        section_overrides = stage_overrides(config_class.section, overrides)
        config = load_config(config_class, config_path, section_overrides)
        if getattr(config, "enabled", True):  # a stage that can be turned off (evaluate)
            planned.append(PlannedStage(s, config, run_stage))
    return planned


def plan_pipeline(config_path: str | None = None, overrides: list[str] = (),
                  input_uri: str | None = None) -> list[PlannedStage]:  # fmt: skip
    """Every stage's config, loaded and checked before anything starts (Ray included): the
    input (when given) and every file a stage will need (weights, models it reads) exist."""
    planned = load_stage_configs(config_path, overrides)
    for p in planned:  # the files each stage will need, before any stage starts
        if hasattr(p.config, "preflight"):
            p.config.preflight()
    if input_uri is not None:
        described = describe_input(Storage(planned[0].config.storage), absolute(input_uri))
        _fit_conditioning(planned, described)
    return planned


def check_cluster(plan: list[PlannedStage], cluster_file: str | None = None,
                  started_here: bool = False) -> None:  # fmt: skip
    """Every planned stage's requests fit a node type of the cluster (core/cluster_fit.py): of
    `cluster_file` (before Ray is joined), else of the connected cluster (a local instance
    `started_here` by `init_ray`: its node)."""
    from pipeline.core.cluster_fit import (
        check_requests,
        live_node_types,
        node_types_from_file,
        stage_requests,
    )

    if cluster_file:
        node_types, source = node_types_from_file(cluster_file), cluster_file
    else:
        node_types, source = live_node_types(started_here)
        if node_types is None:  # an autoscaler whose node types only its YAML knows
            return
    requests = [r for p in plan for r in stage_requests(p.stage.name, p.config.section, p.config)]
    check_requests(requests, node_types, source)


def _fit_conditioning(plan: list[PlannedStage], described: InputDescription) -> None:
    """Resolve train-ar's conditioning against what the input has (refusing what it cannot
    serve) and check that the sample stage asks for what that model takes; the run's first
    line says which."""
    configs = {p.stage.name: p.config for p in plan}
    train_ar, sample = configs["train-ar"], configs["sample"]
    asked = train_ar.conditioning
    train_ar.conditioning = train_ar.resolve_conditioning(described.labels, described.captions,
                                                          f"the input ({described})")  # fmt: skip
    how = " (auto)" if asked == "auto" else ""
    print(f"rqpipe plan: the input is {described}: the RQ-Transformer will be conditioned on "
          f"{CONDITIONED_ON[train_ar.conditioning]}{how}", flush=True)  # fmt: skip
    prompted = bool(sample.prompts or sample.prompts_file)
    if prompted and train_ar.conditioning != "text":
        raise ConfigError(f"sample.prompts / prompts_file are set, but the RQ-Transformer will be "
                          f"conditioned on {CONDITIONED_ON[train_ar.conditioning]}: remove them "
                          f"(sample.prompts=null), or give an input with captions")  # fmt: skip
    if sample.cfg_scale != 1.0 and train_ar.conditioning == "none":
        raise ConfigError(f"sample.cfg_scale={sample.cfg_scale} (guidance) needs a conditional "
                          f"model, and the input has no labels or captions: set "
                          f"sample.cfg_scale=1")  # fmt: skip
    if sample.labels is not None and train_ar.conditioning != "class":
        raise ConfigError(f"sample.labels is set, but the RQ-Transformer will be conditioned on "
                          f"{CONDITIONED_ON[train_ar.conditioning]}: remove it "
                          f"(sample.labels=null)")  # fmt: skip


CONDITIONED_ON = {"text": "captions", "class": "class labels", "none": "nothing (unconditional)"}


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
