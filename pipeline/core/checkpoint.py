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
