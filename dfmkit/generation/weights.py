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


def _sharded_tensors(model: torch.nn.Module, prefix: str = "") -> dict[str, ShardedTensor]:
    """The model's tensors as megatron's sharded state dict describes them (this rank's piece of each)."""
    flat = _flatten(model.sharded_state_dict(prefix=prefix), {})
    return {k: v for k, v in flat.items() if isinstance(v, ShardedTensor)}


def read_checkpoint_states(
    model: torch.nn.Module, checkpoint: Path, which: Sequence[str] = WEIGHTS
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"model": {name: tensor}, "ema": {...}}``: this rank's shards (in the model's current layout) of
    the raw and EMA weights in ``checkpoint``, under plain ``model.state_dict()`` names, in the dtypes they
    were saved in. Only those entries are read from megatron's distributed checkpoint."""
    sharded = _sharded_tensors(model, prefix="model.")
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


def full_shapes(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(full shape, dtype) of every tensor of ``model.state_dict()``: the shapes with the tensor-parallel shards
    gathered, which the weight files of an export hold."""
    return {name: (tuple(sh.global_shape[sh.prepend_axis_num:]), sh.dtype)
            for name, sh in _sharded_tensors(model).items()}


def slice_for_layout(model: torch.nn.Module, full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's pieces of FULL (tensor-parallel gathered) weights ``full``, under ``model.state_dict()``
    names, for the model's current tensor-parallel layout (the identity at tensor parallelism 1). ``full`` has
    the names and shapes of :func:`full_shapes` (an export's weights are checked against them as they are read)."""
    local = {}
    for name, sh in _sharded_tensors(model).items():
        tensor = full[name]
        offsets = sh.global_offset[sh.prepend_axis_num:]
        for dim, (offset, size) in enumerate(zip(offsets, sh.local_shape)):
            if size != tensor.shape[dim]:
                tensor = tensor.narrow(dim, offset, size)
        local[name] = tensor
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
