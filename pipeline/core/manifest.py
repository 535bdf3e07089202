"""The idempotency protocol every stage follows.

- fingerprint = hash(stage, format version, the output-affecting config, upstream fingerprints);
  batch sizes, concurrency and other execution knobs stay out of it.
- `_manifest.json` is written last and atomically; it lists every output unit.
- Manifest with the same fingerprint: the stage is up to date (a no-op). With another
  fingerprint: refuse, naming what changed, unless overwrite. No manifest: resume unit by unit,
  with the config the run was started with (`_started.json`); training stages may also raise
  `steps` (extend) and change `num_workers` (see `begin_stage`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.core.storage import Storage, join

MANIFEST_NAME = "_manifest.json"
STARTED_NAME = "_started.json"  # the planned manifest of a run in progress, and its history


def fingerprint(
    stage: str, format_version: int, config: dict[str, Any], upstream: dict[str, str]
) -> str:
    payload = json.dumps(
        {"stage": stage, "format": format_version, "config": config, "upstream": upstream},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass
class Manifest:
    stage: str
    format_version: int
    config: dict[str, Any]  # the output-affecting fields, as fingerprinted
    upstream: dict[str, str]  # upstream stage -> its fingerprint
    units: list[dict[str, Any]] = field(default_factory=list)  # {"name", "rows", "bytes"}
    counts: dict[str, int] = field(default_factory=dict)
    # What downstream stages need to know of the output without reading it (the code tables'
    # shape, classes, captions): a re-run plans from the manifest alone.
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.stage, self.format_version, self.config, self.upstream)

    def to_json(self) -> bytes:
        document = {"fingerprint": self.fingerprint, **asdict(self)}
        return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"


class StageConflict(RuntimeError):
    pass


def read_manifest(storage: Storage, stage_dir: str) -> Manifest | None:
    """The stage's manifest, or None: one GET (no HEAD first), as a no-op re-run reads it."""
    try:
        document = json.loads(storage.read_bytes(join(stage_dir, MANIFEST_NAME)))
    except FileNotFoundError:
        return None
    document.pop("fingerprint", None)
    return Manifest(**document)


def write_manifest(storage: Storage, stage_dir: str, manifest: Manifest) -> None:
    """Mark a stage finished. Its writers are done, so what a killed one left goes first."""
    storage.remove_temporaries(stage_dir)
    storage.write_bytes(join(stage_dir, MANIFEST_NAME), manifest.to_json())


def _changes(old: Manifest, new: Manifest) -> list[str]:
    changes = []
    if old.format_version != new.format_version:
        changes.append(f"format version {old.format_version} -> {new.format_version}")
    for key in sorted(set(old.config) | set(new.config)):
        if old.config.get(key) != new.config.get(key):
            changes.append(f"{key}: {old.config.get(key)!r} -> {new.config.get(key)!r}")
    for key in sorted(set(old.upstream) | set(new.upstream)):
        if old.upstream.get(key) != new.upstream.get(key):
            changes.append(f"upstream {key} changed")
    return changes or ["(fingerprint differs)"]


def _resumable_change(old: Manifest, new: Manifest, resumable: tuple[str, ...]) -> bool:
    """Whether `new` may continue `old`'s checkpoints: same format and upstream, and the only
    changed fields are `resumable` ones, with `steps` never lowered."""
    if old.format_version != new.format_version or old.upstream != new.upstream:
        return False
    changed = {
        k for k in set(old.config) | set(new.config) if old.config.get(k) != new.config.get(k)
    }
    if not changed <= set(resumable):
        return False
    return "steps" not in changed or new.config["steps"] > old.config["steps"]


def _clear(storage: Storage, stage_dir: str) -> None:
    """Remove a stage's output but not its lease, which the caller holds."""
    for uri, _ in storage.list_files(stage_dir):
        if uri.rsplit("/", 1)[-1] != "_lease.json":
            storage.remove_file(uri)


def _read_started(storage: Storage, stage_dir: str) -> tuple[Manifest | None, list[Any]]:
    try:
        document = json.loads(storage.read_bytes(join(stage_dir, STARTED_NAME)))
    except FileNotFoundError:
        return None, []
    history = document.pop("history", [])
    document.pop("fingerprint", None)
    return Manifest(**document), history


def begin_stage(
    storage: Storage,
    stage_dir: str,
    planned: Manifest,
    overwrite: bool = False,
    resumable: tuple[str, ...] = (),
) -> Manifest | None:
    """The existing manifest when the stage is up to date (do nothing), else None: the stage
    runs, resuming what is there. Before that, a config that differs from the one the output
    was made (finished: `_manifest.json`) or started (`_started.json`) with is refused, naming
    the changes, unless every change is in `resumable` (training: `steps` up, `num_workers`):
    then a finished stage is extended and an unfinished one continues, and the change is
    recorded in `_started.json`'s history. `overwrite` removes the old output instead."""
    finished = read_manifest(storage, stage_dir)
    if finished is not None and finished.fingerprint == planned.fingerprint:
        print(f"{planned.stage}: up to date ({stage_dir})")
        return finished
    started, history = _read_started(storage, stage_dir)
    previous = finished or started
    if previous is not None and previous.fingerprint != planned.fingerprint:
        changes = _changes(previous, planned)
        what = "finished" if finished is not None else "unfinished"
        if overwrite:
            print(f"{planned.stage}: --overwrite: removing the previous {stage_dir}")
            _clear(storage, stage_dir)
            history = []
        elif _resumable_change(previous, planned, resumable):
            verb = "extending the finished" if finished is not None else "resuming the"
            print(f"{planned.stage}: {verb} run in {stage_dir} from its last checkpoint, "
                  f"with {'; '.join(changes)}")  # fmt: skip
            history.append({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "from": what, "changes": changes})  # fmt: skip
            if finished is not None:
                storage.remove_file(join(stage_dir, MANIFEST_NAME))
        else:
            allowed = f" (may change on resume: {', '.join(resumable)})" if resumable else ""
            raise StageConflict(
                f"{stage_dir} holds {what} {planned.stage} output made with another config: "
                f"{'; '.join(changes)}{allowed}. Run it with the config it was made with, "
                f"pass --overwrite to replace it, or choose another --run-dir."
            )
    document = json.loads(planned.to_json())
    document["history"] = history
    storage.write_bytes(join(stage_dir, STARTED_NAME), json.dumps(document, indent=2).encode())
    return None


def require_manifest(storage: Storage, stage_dir: str, stage: str) -> Manifest:
    """The finished upstream stage's manifest, or an error saying which stage to run."""
    manifest = read_manifest(storage, stage_dir)
    if manifest is None:
        raise FileNotFoundError(f"no finished {stage} output in {stage_dir}: run the {stage} "
                                f"stage first (jobs/{stage.replace('-', '_')}.py)")  # fmt: skip
    return manifest


def model_fingerprint(storage: Storage, model_uri: str, stage: str) -> str:
    """What identifies a model folder: the fingerprint of the `stage` run that exported it
    (RUN/vae/model -> RUN/vae/_manifest.json), else the hash of its weights."""
    import hashlib

    manifest = read_manifest(storage, model_uri.rstrip("/").rsplit("/", 1)[0])
    if manifest is not None and manifest.stage == stage:
        return manifest.fingerprint
    weights = storage.read_bytes(join(model_uri, "model.safetensors"))
    return hashlib.sha256(weights).hexdigest()[:32]


def vae_fingerprint(storage: Storage, vae_uri: str) -> str:
    """The RQ-VAE's identity, as recorded in the code tables' metadata."""
    return model_fingerprint(storage, vae_uri, "train-vae")
