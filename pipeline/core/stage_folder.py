"""One stage's folder of a run, and everything that lives in it.

RUN/{shards,vae,codes,ar,samples,eval}/ each hold a stage's output units, `_manifest.json`
(written last: the stage is finished), `_started.json` (the config a run in progress started
with, and its history), `_lease.json` (who is writing it) and, for training stages, the metrics
log. `StageFolder` is that folder as an object: every stage opens its own and its upstream
stages' through it, instead of repeating `absolute(run_dir)`, `Storage(...)`, `join(...)` and
`require_manifest(...)`.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.config import to_dict, write_resolved_config
from pipeline.core.manifest import (
    Manifest,
    begin_stage,
    read_manifest,
    require_manifest,
    write_manifest,
)
from pipeline.core.storage import Storage, StorageConfig, absolute, join

# stage -> its folder under the run dir
FOLDERS = {"shard": "shards", "train-vae": "vae", "encode": "codes", "train-ar": "ar",
           "sample": "samples", "evaluate": "eval"}  # fmt: skip


class StageFolder:
    """`stage`'s folder under `run_dir` (or at `uri`, where a config can move it: the sample
    stage's `out`). Local paths are made absolute here, in the driver, before anything reaches
    a Ray worker: a worker runs in a working directory of its own."""

    def __init__(self, run_dir: str, stage: str, storage: StorageConfig | Storage | None = None,
                 uri: str | None = None) -> None:  # fmt: skip
        if stage not in FOLDERS:
            raise KeyError(f"unknown stage {stage!r}; stages: {list(FOLDERS)}")
        self.run_dir, self.stage = absolute(run_dir), stage
        self.storage = storage if isinstance(storage, Storage) else Storage(storage)
        self.uri = absolute(uri) if uri else join(self.run_dir, FOLDERS[stage])

    def __repr__(self) -> str:
        return f"StageFolder({self.stage!r}, {self.uri!r})"

    def path(self, *parts: str) -> str:
        """A URI inside this stage's folder."""
        return join(self.uri, *parts)

    def run_path(self, *parts: str) -> str:
        """A URI inside the run dir (another stage's default model folder, labels.json)."""
        return join(self.run_dir, *parts)

    def of(self, stage: str) -> StageFolder:
        """Another stage's folder of the same run, on the same storage."""
        return StageFolder(self.run_dir, stage, self.storage)

    def upstream(self, stage: str) -> Manifest:
        """A finished upstream stage's manifest, or an error saying which stage to run."""
        return require_manifest(self.storage, self.of(stage).uri, stage)

    def manifest(self) -> Manifest | None:
        """This stage's manifest when it is finished."""
        return read_manifest(self.storage, self.uri)

    def begin(self, planned: Manifest, overwrite: bool, config: Any = None,
              resumable: tuple[str, ...] = (), **also: Any) -> Manifest | None:  # fmt: skip
        """The finished manifest when the stage is up to date (the caller returns it), else
        None: the stage runs (manifest.begin_stage: conflicts refused, resumes kept), and the
        resolved `config` is saved as config.yaml, with any `also` sections beside it."""
        finished = begin_stage(self.storage, self.uri, planned, overwrite, resumable)
        if finished is None and config is not None:
            self.save_config(config, **also)
        return finished

    def save_config(self, config: Any, **also: Any) -> None:
        """The resolved config beside the output, config.yaml, with `also` sections."""
        document = {type(config).section: to_dict(config), **also}
        write_resolved_config(self.storage, self.path("config.yaml"), document)

    def finished_files(self, *parts: str) -> dict[str, int]:
        """The files already in this folder (or its sub-folder `parts`), name -> size, from one
        paginated listing: how a resumed stage finds its finished units, instead of a request
        per unit. They can be trusted without reading them: `begin` refuses (or, with
        --overwrite, clears) a folder started under another config, so whatever is here was
        written by a run of this one, and every write is whole or absent (atomic)."""
        return self.storage.list_folder(self.path(*parts))

    def finish(self, planned: Manifest) -> Manifest:
        """Write the manifest, last: the stage is finished."""
        write_manifest(self.storage, self.uri, planned)
        return planned

    def size(self, *parts: str) -> int:
        """The size in bytes of a file in the folder."""
        fs, path = self.storage.fs(self.path(*parts))
        return int(fs.size(path))
