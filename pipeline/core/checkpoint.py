"""Training state <-> files, without pickle: tensors in safetensors, structure in JSON.

Optimizer state dicts nest tensors inside dicts and lists; `save_state` stores each tensor under
its path and the rest of the structure as JSON with {"__tensor__": path} placeholders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().contiguous().cpu()
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {"__dict__": [[_split(k, f"{path}.k{i}", tensors),
                              _split(v, f"{path}.{i}", tensors)]
                             for i, (k, v) in enumerate(value.items())]}  # fmt: skip
    if isinstance(value, list | tuple):
        items = [_split(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {_join(k, tensors): _join(v, tensors) for k, v in value["__dict__"]}
        if "__tuple__" in value:
            return tuple(_join(v, tensors) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


class _NoTensors(dict):
    def __missing__(self, path: str) -> None:
        return None


def state_fields(structure: Any) -> Any:
    """A saved state's structure (its {name}.json, parsed) with every tensor as None: what a
    driver reads of a checkpoint (its step) without loading the tensors."""
    return _join(structure, _NoTensors())


def save_state(state: dict[str, Any], directory: str | Path, name: str) -> None:
    """Write `state` as {name}.safetensors + {name}.json in `directory`."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _split(state, "s", tensors)
    directory = Path(directory)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure))


def load_state(directory: str | Path, name: str, device: str | torch.device = "cpu") -> Any:
    directory = Path(directory)
    tensors = load_file(str(directory / f"{name}.safetensors"), device=str(device))
    return _join(json.loads((directory / f"{name}.json").read_text()), tensors)


# -- uploads ----------------------------------------------------------------------------------


def check_uploaded(local_dir: str, filesystem: Any, destination: str) -> None:
    """Every file of `local_dir` is at `destination` on the pyarrow `filesystem`, whole; else
    OSError naming the first that is not. pyarrow's `copy_files`, which Ray Train uploads
    checkpoints with, returns normally when an upload failed (a multipart upload cut by a store
    outage: bench/upload_outage.py), so a checkpoint could be committed without a file."""
    import os

    from pyarrow.fs import FileType

    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            relative = os.path.relpath(os.path.join(root, name), local_dir)
            expected = os.path.getsize(os.path.join(root, name))
            info = filesystem.get_file_info(f"{destination.rstrip('/')}/{relative}")
            if info.type != FileType.File or info.size != expected:
                found = "missing" if info.type != FileType.File else f"{info.size} bytes"
                raise OSError(f"checkpoint upload incomplete: {relative} is {found} at "
                              f"{destination} ({expected} bytes written locally)")  # fmt: skip


def verified_checkpoint_upload(checkpoint: Any, checkpoint_dir_name: str) -> Any:
    """Ray Train's `checkpoint_upload_fn`: its own upload, then `check_uploaded`. A short
    upload raises, so Ray Train fails the worker and the stage resumes from the last complete
    checkpoint instead of committing this one."""
    # Ray 2.58 gives the upload function no storage context: it is taken from the train
    # context, as Ray Train's own default upload takes it.
    from ray.train.v2._internal.execution.context import get_train_context

    storage = get_train_context().storage_context
    persisted = storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
    check_uploaded(checkpoint.path, storage.storage_filesystem, persisted.path)
    return persisted
