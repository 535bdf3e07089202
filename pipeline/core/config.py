"""Stage configs: dataclasses loaded from a YAML preset, overridden by `key=value` arguments.

Nested dataclasses are addressed with dots (`loss.gan_weight=0`); values are parsed as YAML
(`ch_mult=[1,2,2]`, `kmeans_init=true`). Unknown keys and ill-typed values are errors that
name the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    pass


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(hint, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        return value
    if hint is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "2e-3" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type[C], values: dict[str, Any], prefix: str = "") -> C:
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
            f"valid keys: {sorted(prefix + k for k in types_)}"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"invalid {cls.__name__}: {e}") from e


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to a nested dict (a copy)."""
    values = json.loads(json.dumps(values))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. steps=100)")
        key, raw = item.split("=", 1)
        node = values
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return values


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] = ()) -> C:
    """Defaults of `cls`, then the YAML file (its `cls.section` mapping if present), then overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            document = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        section = getattr(cls, "section", None)
        values = document.get(section, {}) if section and section in document else document
    return from_dict(cls, apply_overrides(values, list(overrides)))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def output_fields(config: Any) -> dict[str, Any]:
    """The fields that change a stage's output: all but the class's `execution_fields`."""
    skip = getattr(type(config), "execution_fields", ())
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}


def write_resolved_config(storage: Any, uri: str, document: dict[str, Any]) -> None:
    """The resolved config saved beside an artifact (config.yaml), with credentials that may
    sit in URLs (an endpoint's user:secret@) redacted."""
    from pipeline.core.storage import redact

    storage.write_bytes(uri, redact(yaml.safe_dump(document, sort_keys=False)).encode())
