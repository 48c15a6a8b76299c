"""torch's fused Adam(W) told the gradient scale and the skip flag as device tensors, as its GradScaler does.

Checked on torch 2.13.0 (the GPU path also on torch 2.11 CUDA).

torch's fused Adam kernels take a ``grad_scale`` (every gradient is divided by it as the kernel reads it) and a
``found_inf`` flag (where it is 1 the kernel changes nothing, not even the step count), both device tensors:
``Adam.step`` passes its attributes ``grad_scale`` and ``found_inf`` to them, which is how
``torch.amp.GradScaler`` hands them over (``_step_supports_amp_scaling``). The protocol is not public API.
:func:`fused_step_scaling` sets the two attributes for one step, so dfmkit's step
(:func:`dfmkit.train.optim.step_on_device`) clips and skips without the host waiting for the GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Iterator, Sequence

import torch

from dfmkit.compat import missing_attributes, missing_parameters

CHECKED_ON = {"torch": "2.13.0"}


@contextlib.contextmanager
def fused_step_scaling(adams: Sequence[torch.optim.Optimizer], grad_scale: torch.Tensor,
                       found_inf: torch.Tensor) -> Iterator[None]:
    """Inside the block, the fused ``adams`` divide each gradient by ``grad_scale`` and do nothing where
    ``found_inf`` is 1 (both float32 device tensors)."""
    for inner in adams:
        inner.grad_scale, inner.found_inf = grad_scale, found_inf
    try:
        yield
    finally:
        for inner in adams:
            del inner.grad_scale, inner.found_inf


def check() -> list[str]:
    adam = importlib.import_module("torch.optim.adam")  # (torch.optim deletes the name of its submodule)

    patch = "fused_step_scaling"
    problems = missing_parameters(patch, adam, "_fused_adam", "grad_scale", "found_inf")
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        problems += missing_attributes(patch, cls, "step")
        if hasattr(cls, "step"):
            source = inspect.getsource(cls.step)
            problems += [f"{patch}: {cls.__module__}.{cls.__qualname__}.step does not read self.{name}"
                         for name in ("grad_scale", "found_inf") if f'"{name}"' not in source]
    fused = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
    if not getattr(fused, "_step_supports_amp_scaling", False):
        problems.append(f"{patch}: torch's fused AdamW no longer says it takes a gradient scale "
                        "(_step_supports_amp_scaling)")
    return problems
