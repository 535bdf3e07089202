"""The idempotency protocol every stage follows.

- fingerprint = hash(stage, format version, the output-affecting config, upstream fingerprints);
  batch sizes, concurrency and other execution knobs stay out of it.
- `_manifest.json` is written last and atomically; it lists every output unit.
- Manifest with the same fingerprint: the stage is up to date (a no-op). With another
  fingerprint: refuse, naming what changed, unless overwrite. No manifest: resume unit by unit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pipeline.core.storage import Storage, join

MANIFEST_NAME = "_manifest.json"
Status = Literal["up_to_date", "resume", "overwrite"]


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

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.stage, self.format_version, self.config, self.upstream)

    def to_json(self) -> bytes:
        document = {"fingerprint": self.fingerprint, **asdict(self)}
        return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"


class StageConflict(RuntimeError):
    pass


def read_manifest(storage: Storage, stage_dir: str) -> Manifest | None:
    uri = join(stage_dir, MANIFEST_NAME)
    if not storage.exists(uri):
        return None
    document = json.loads(storage.read_bytes(uri))
    document.pop("fingerprint", None)
    return Manifest(**document)


def write_manifest(storage: Storage, stage_dir: str, manifest: Manifest) -> None:
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


def stage_status(
    storage: Storage, stage_dir: str, planned: Manifest, overwrite: bool = False
) -> Status:
    """What to do with `stage_dir` for a stage about to produce `planned`."""
    existing = read_manifest(storage, stage_dir)
    if existing is None:
        return "resume"
    if existing.fingerprint == planned.fingerprint:
        return "up_to_date"
    if overwrite:
        return "overwrite"
    raise StageConflict(
        f"{stage_dir} already holds {existing.stage} output made differently: "
        f"{'; '.join(_changes(existing, planned))}. Pass --overwrite to replace it, "
        f"or choose another --run-dir."
    )


def begin_stage(
    storage: Storage, stage_dir: str, planned: Manifest, overwrite: bool = False
) -> Manifest | None:
    """The existing manifest when the stage is up to date (do nothing), else None: resume,
    or start afresh after removing a differently made output when `overwrite`."""
    status = stage_status(storage, stage_dir, planned, overwrite)
    if status == "up_to_date":
        print(f"{planned.stage}: up to date ({stage_dir})")
        return read_manifest(storage, stage_dir)
    if status == "overwrite":
        print(f"{planned.stage}: --overwrite: removing the previous {stage_dir}")
        storage.remove_tree(stage_dir)
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
