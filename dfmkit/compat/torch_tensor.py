"""A tensor's version counter: torch's private ``Tensor._version``, which every in-place change advances.

Checked on torch 2.13.0.

:meth:`dfmkit.batch.PackedBatch.host` keeps host copies of a batch's small index tensors (their lengths), so a
model on the GPU reads them without a device sync; the counter tells whether a tensor was changed in place since
its copy was taken. torch has no public way to ask.
"""

from __future__ import annotations

import torch

CHECKED_ON = {"torch": "2.13.0"}


def version(tensor: torch.Tensor) -> int | None:
    """How many times ``tensor`` (or a view of its storage) was changed in place; None for an inference tensor (made
    under ``torch.inference_mode``), which keeps no count: it can only change inside inference mode, and the values
    dfmkit keeps for one (a pack's layout) are taken as unchanged."""
    return None if tensor.is_inference() else tensor._version


def check() -> list[str]:
    tensor = torch.zeros(2)
    try:
        before = tensor._version
        tensor[1:].add_(1)
        after = tensor._version
    except AttributeError:
        return ["version: torch.Tensor has no '_version'"]
    if not (isinstance(before, int) and after > before):
        return [f"version: an in-place add through a view leaves torch.Tensor._version at {before} -> {after}"]
    with torch.inference_mode():
        inference = torch.zeros(2)
    if not inference.is_inference():
        return ["version: a tensor made under torch.inference_mode is not an inference tensor"]
    return []
