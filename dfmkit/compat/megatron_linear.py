"""megatron-core's tensor-parallel linears: a RowParallelLinear that hands its own TP group to its matmul.

What it changes: :class:`RowParallelLinear` subclasses ``megatron.core.tensor_parallel.RowParallelLinear`` and
overrides its private ``_forward_impl`` to set the ``tp_group`` keyword to the layer's own ``tp_group``.

Why: megatron-core 0.16's ``RowParallelLinear.forward`` calls ``_forward_impl(..., tp_group=None)``; the
matmul it reaches (``linear_with_grad_accumulation_and_async_allreduce``) then warns on every call and looks the
group up itself, which breaks a torch.compile graph of a DiT layer in two. The DiT's output projections and
MLP ``fc2`` are built from this class (:mod:`dfmkit.components.backbones.dit.block`); the numbers are the same.

Checked on megatron-core 0.16.1.
"""

from __future__ import annotations

import inspect

from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import layers

from dfmkit.compat import missing_attributes

CHECKED_ON = {"megatron-core": "0.16.1"}

PATCH = "RowParallelLinear._forward_impl (tp_group)"


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron's RowParallelLinear, handing its own TP group to the matmul (see the module docstring)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def _takes(function, name: str) -> bool:
    parameters = inspect.signature(function).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def check() -> list[str]:
    base = tensor_parallel.RowParallelLinear
    problems = missing_attributes(PATCH, base, "_forward_impl")
    if not problems and not _takes(base._forward_impl, "tp_group"):
        problems.append(f"{PATCH}: {base.__module__}.RowParallelLinear._forward_impl takes no 'tp_group'")
    if "tp_group" not in inspect.signature(base.__init__).parameters:
        problems.append(f"{PATCH}: {base.__module__}.RowParallelLinear() takes no 'tp_group' (the group it would pass)")
    for name in ("linear_with_grad_accumulation_and_async_allreduce", "linear_with_frozen_weight"):
        function = getattr(layers, name, None)
        if function is None:
            problems.append(f"{PATCH}: {layers.__name__} has no '{name}' (what _forward_impl calls)")
        elif "tp_group" not in inspect.signature(function).parameters:
            problems.append(f"{PATCH}: {layers.__name__}.{name} takes no 'tp_group'")
    return problems
