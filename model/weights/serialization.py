"""Model artifacts: `model.safetensors` + `config.json` under any fsspec URI. No pickle."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from model.weights.fileio import read_bytes, write_bytes_atomic
from model.weights.hub import download_model, hub_repo

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


def save_pretrained(
    module: nn.Module,
    uri: str,
    model_type: str,
    config: dict[str, Any],
    storage_options: dict | None = None,
) -> None:
    """Weights first, config last: a folder with a config.json always has its weights."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    write_bytes_atomic(
        f"{uri.rstrip('/')}/{WEIGHTS_NAME}",
        save_safetensors(state, metadata={"model_type": model_type}),
        storage_options,
    )
    document = {"model_type": model_type, "format_version": FORMAT_VERSION, "config": config}
    write_bytes_atomic(
        f"{uri.rstrip('/')}/{CONFIG_NAME}",
        json.dumps(document, indent=2).encode() + b"\n",
        storage_options,
    )


def load_pretrained(
    uri: str, model_type: str, map_location: str = "cpu", storage_options: dict | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """-> (config dict, state dict) of a saved model, checking it is of `model_type`. `uri`: a
    folder path, an fsspec URI, or a Hugging Face Hub model (hf://org/name, model/weights/hub.py)."""
    if hub_repo(uri) is not None:
        uri, storage_options = download_model(uri), None
    base = uri.rstrip("/")
    try:
        document = json.loads(read_bytes(f"{base}/{CONFIG_NAME}", storage_options))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {CONFIG_NAME} under {uri!r}: expected a folder written by save_pretrained"
        ) from None
    found = document.get("model_type")
    if found != model_type:
        raise ValueError(f"{uri!r} holds a {found!r} model, not a {model_type!r} model")
    if document.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{uri!r} was written by a newer rqpipe (format {document['format_version']}); "
            "upgrade rqpipe to load it"
        )
    state = load_safetensors(read_bytes(f"{base}/{WEIGHTS_NAME}", storage_options))
    return document["config"], {k: v.to(map_location) for k, v in state.items()}


class ModelConfig:
    """Base of the model configs (dataclasses): named presets and checked construction.

    A subclass sets `presets` (name -> field values) and `kind` (its name in messages)."""

    kind: ClassVar[str]
    presets: ClassVar[dict[str, dict[str, Any]]]

    @classmethod
    def preset(cls, name: str, **overrides: Any):
        """The preset `name`, with field overrides on top of it."""
        if name not in cls.presets:
            raise KeyError(f"unknown {cls.kind} preset {name!r}; choose one of "
                           f"{sorted(cls.presets)}")  # fmt: skip
        return cls.from_dict({**cls.presets[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.kind} config keys {unknown}; valid keys: "
                             f"{sorted(known)}")  # fmt: skip
        return cls(**values)


class Pretrained:
    """save_pretrained / from_pretrained for a module with a dataclass `config`."""

    model_type: ClassVar[str]
    config_class: ClassVar[type]
    config: Any

    def save_pretrained(self, uri: str, storage_options: dict | None = None) -> None:
        save_pretrained(self, uri, self.model_type, dataclasses.asdict(self.config),
                        storage_options)  # fmt: skip

    @classmethod
    def _build(cls, config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
        return cls(config)

    @classmethod
    def from_pretrained(cls, uri: str, map_location: str = "cpu",
                        storage_options: dict | None = None):  # fmt: skip
        config, state = load_pretrained(uri, cls.model_type, map_location, storage_options)
        model = cls._build(cls.config_class.from_dict(config), state)
        model.load_state_dict(state)
        return model.eval()


def architecture_changes(found: dict[str, Any], expected: Any) -> list[str]:
    """The config fields in which a saved model (`found`, its config.json) differs from the
    `expected` dataclass config, as "field: saved -> expected" lines."""
    wanted = json.loads(json.dumps(dataclasses.asdict(expected)))
    return [f"{k}: {found.get(k)!r} -> {v!r}" for k, v in wanted.items() if found.get(k) != v]


def init_from_pretrained(module: Pretrained, uri: str, storage_options: dict | None = None) -> None:
    """Fine-tuning's start: the weights (and buffers) of the saved model at `uri`, which must
    have `module`'s architecture, loaded into `module`."""
    config, state = load_pretrained(uri, module.model_type, "cpu", storage_options)
    changes = architecture_changes(config, module.config)
    if changes:
        raise ValueError(f"init_from={uri} is a model of another architecture "
                         f"({'; '.join(changes)}): give a model with this config")  # fmt: skip
    module.load_state_dict(state)


def read_foreign_weights(path: str) -> dict[str, torch.Tensor]:
    """A foreign checkpoint (a plain state dict: torchvision's, torch-fidelity's .pth), read
    without unpickling anything but tensors (`weights_only=True`)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                 what: str) -> nn.Module:  # fmt: skip
    """`state` into `module` when every tensor name and shape matches, else a ValueError naming
    what is missing, unexpected or misshapen (BatchNorm's `num_batches_tracked` counters are
    ignored). -> the module in eval mode, without gradients."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    expected = {k: v for k, v in module.state_dict().items()
                if not k.endswith("num_batches_tracked")}  # fmt: skip
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]  # fmt: skip
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not hold {what}: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, wrong shape {wrong[:4]}")  # fmt: skip
    module.load_state_dict(state, strict=False)
    return module.eval().requires_grad_(False)
