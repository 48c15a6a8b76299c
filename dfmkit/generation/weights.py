"""Weights into a model of any parallel layout: this rank's shards read from megatron's distributed checkpoint
(which reshards on load), or cut from full tensors (an export), and copied into the model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from dfmkit.compat.torch_dcp import restricted_unpickling
from dfmkit.errors import CheckpointError, GenerateError
from dfmkit.train.checkpoint import load_sharded

WEIGHTS = ("ema", "model")


def _flatten(node: Any, out: dict[str, Any]) -> dict[str, Any]:
    for key, value in node.items():
        if isinstance(value, dict):
            _flatten(value, out)
        else:
            out[key] = value
    return out


def read_checkpoint_states(
    model: torch.nn.Module, checkpoint: Path, which: Sequence[str] = WEIGHTS
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"model": {name: tensor}, "ema": {...}}``: this rank's shards (in the model's current layout) of
    the raw and EMA weights in ``checkpoint``, under plain ``model.state_dict()`` names, in the dtypes they
    were saved in. Only those entries are read from megatron's distributed checkpoint."""
    sharded = {k: v for k, v in _flatten(model.sharded_state_dict(prefix="model."), {}).items()
               if isinstance(v, ShardedTensor)}
    try:
        with restricted_unpickling(checkpoint):
            saved = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    except CheckpointError:
        raise
    except Exception as exc:  # megatron raises several kinds for unreadable folders
        raise GenerateError(f"{checkpoint} is not a readable megatron distributed checkpoint "
                            f"({type(exc).__name__}: {str(exc)[:300]})") from None
    trained = {id(p) for p in model.parameters() if p.requires_grad}  # what the EMA covers (dfmkit.train.ema)
    request: dict[str, dict[str, ShardedTensor]] = {}
    problems = []
    for entry in which:
        prefix = "" if entry == "model" else f"{entry}."
        request[entry] = {}
        for name, sh in sharded.items():
            if entry == "ema" and id(sh.data) not in trained:
                continue
            key = prefix + sh.key
            meta = saved.get(key)
            if meta is None:
                problems.append(f"missing {key}")
                continue
            if tuple(meta.global_shape) != tuple(sh.global_shape):
                problems.append(f"{key} has shape {tuple(meta.global_shape)}, the model's is {tuple(sh.global_shape)}")
                continue
            buffer = torch.empty(sh.local_shape, dtype=meta.dtype, device=sh.data.device)
            request[entry][name] = dataclasses.replace(sh, key=key, data=buffer, dtype=meta.dtype)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise GenerateError(f"{checkpoint} does not fit the model of its recipe: {shown}")
    loaded = load_sharded(checkpoint, request)
    return {entry: {name[len("model."):]: tensor for name, tensor in loaded[entry].items()} for entry in which}


def slice_for_layout(model: torch.nn.Module, full: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """This rank's pieces of FULL (tensor-parallel gathered) weights ``full``, under ``model.state_dict()``
    names, for the model's current tensor-parallel layout (the identity at tensor parallelism 1)."""
    sharded = {k: v for k, v in _flatten(model.sharded_state_dict(prefix=""), {}).items()
               if isinstance(v, ShardedTensor)}
    missing = sorted(set(sharded) - set(full))
    unexpected = sorted(set(full) - set(sharded))
    problems = [f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")] if missing else []
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    local = {}
    for name, sh in sharded.items():
        if name not in full:
            continue
        tensor = full[name]
        expected = tuple(sh.global_shape[sh.prepend_axis_num:])
        if tuple(tensor.shape) != expected:
            problems.append(f"{name} has shape {tuple(tensor.shape)}, the model's is {expected}")
            continue
        offsets = sh.global_offset[sh.prepend_axis_num:]
        for dim, (offset, size) in enumerate(zip(offsets, sh.local_shape)):
            if size != tensor.shape[dim]:
                tensor = tensor.narrow(dim, offset, size)
        local[name] = tensor
    if problems:
        raise GenerateError(f"{source} does not fit the model of its recipe: " + "; ".join(problems[:6]))
    return local


def assign_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model; every parameter and buffer must be there (megatron's ``_extra_state``
    entries, which hold no tensors, are not needed)."""
    wanted = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    missing = sorted(wanted - set(state))
    if missing:
        raise GenerateError(f"weights for {', '.join(missing[:5])} are missing")
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False)
