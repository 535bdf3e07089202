"""Sharded training (`strategy: fsdp`): FSDP2's `fully_shard` over a model's blocks, sharded
checkpoints without pickle, and the full weights gathered where one rank needs them.

Under FSDP each rank holds 1/N of every parameter, gradient and Adam moment, so a model whose
training state is larger than one device (the 3.8B RQ-Transformer: ~61 GB) trains on N of them.

Checkpoints: `torch.distributed.checkpoint` with its safetensors writer (`HuggingFaceStorage
Writer`, `save_distributed`): every rank writes its own shards, with their offsets in the file's
header, to `sharded/` in its own local folder; Ray Train merges the ranks' folders into one
checkpoint. Nothing is pickled: DCP's default writer would store a pickled `.metadata`, this one
reads the layout back from the safetensors headers. Rank 0 adds `trainer.json`: the step and the
optimizer's param groups (the non-tensor part). A checkpoint in the DDP layout (`model` +
`trainer` via core/checkpoint.py) loads into a sharded model too, and a sharded one into a DDP
model, so `strategy` may change when a run resumes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

SHARDED_DIR = "sharded"


def shard_model(model: torch.nn.Module, block_types: tuple[type, ...]) -> torch.nn.Module:
    """`fully_shard` every module of `block_types` (each block's parameters are gathered just
    before its forward and freed after it), then the rest of the model as the root group.
    Build the optimizer after this: the parameters become DTensors."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, block_types):
            fully_shard(module)
    fully_shard(model)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _flat_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                average: torch.nn.Module | None = None,
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
    """({"model.{fqn}" | "optim.{fqn}.{moment}" | "ema.{fqn}": tensor}, the optimizer's state
    dict); `average`: the weights' moving average (WeightEMA), sharded as the model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    flat = {f"model.{k}": v for k, v in model_state.items()}
    for fqn, moments in optim_state["state"].items():
        flat.update({f"optim.{fqn}.{name}": v for name, v in moments.items()})
    if average is not None:
        flat.update({f"ema.{k}": v for k, v in get_model_state_dict(average).items()})
    return flat, optim_state


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer: dict[str, Any],
                 directory: str, rank: int, average: torch.nn.Module | None = None) -> None:  # fmt: skip
    """Collective: every rank writes its shards to `directory`/sharded (its own folder); rank 0
    the `trainer` fields (the step, the data position) with the optimizer's param groups."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    flat, optim_state = _flat_state(model, optimizer, average)
    path = os.path.join(directory, SHARDED_DIR)
    os.makedirs(path, exist_ok=True)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(path, save_distributed=True))
    if rank == 0:
        with open(os.path.join(directory, "trainer.json"), "w") as f:
            json.dump({**trainer, "param_groups": optim_state["param_groups"]}, f)


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str,
                 average: torch.nn.Module | None = None) -> dict[str, Any]:  # fmt: skip
    """Collective: a checkpoint written by save_sharded (any number of ranks) into `model`,
    `optimizer` and the weights' `average`, sharded or not; -> its trainer fields."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    flat, optim_state = _flat_state(model, optimizer, average)  # the layout to read into
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(os.path.join(directory, SHARDED_DIR)))
    with open(os.path.join(directory, "trainer.json")) as f:
        trainer = json.load(f)
    for fqn, moments in optim_state["state"].items():
        for name in moments:
            moments[name] = flat[f"optim.{fqn}.{name}"]
    for group, saved in zip(optim_state["param_groups"], trainer["param_groups"], strict=True):
        group.update({k: (tuple(v) if isinstance(group.get(k), tuple) else v)
                      for k, v in saved.items() if k != "params"})  # fmt: skip
    model_state = {k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")}
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    if average is not None:
        set_model_state_dict(average, {k[len("ema.") :]: v for k, v in flat.items()
                                       if k.startswith("ema.")})  # fmt: skip
    return trainer


def load_full_into_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:  # fmt: skip
    """A DDP-layout checkpoint (full tensors, the optimizer's state keyed by parameter index)
    into a sharded model: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    by_id = {id(p): n for n, p in model.named_parameters()}
    order = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]  # index -> fqn
    optim_full = {
        "state": {order[int(i)]: s for i, s in optim_state["state"].items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]}
                         for g in optim_state["param_groups"]],
    }  # fmt: skip
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_full,
                   options=StateDictOptions(full_state_dict=True))  # fmt: skip


def load_full_model(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Full weights (a DDP-layout checkpoint's) into a model, sharded or not."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective under FSDP: the full weights, on the CPU of rank 0 (the other ranks get an
    empty dict, so N ranks on one node never hold N full copies)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))  # fmt: skip
