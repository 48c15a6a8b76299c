"""What every packed-attention backend computes, and the sequence description it receives.

A backend is a module ``attend(q, k, v, params) -> out`` over packed ("thd") tensors:
``q [Tq, H, D]``, ``k, v [Tk, H, D]``, ``out [Tq, H, D]``. Segment ``i`` of the queries,
``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]``, attends (bidirectionally, softmax scale ``1/sqrt(D)``)
to segment ``i`` of the keys and nothing else. Every key in a segment is a real key: the DiT
drops padding keys before calling (padding queries are allowed; their outputs are never used
by real tokens). Segments hold at least one key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class VarlenParams:
    """Segment boundaries of one packed attention call, on the device and on the host."""

    cu_seqlens_q: torch.Tensor  # [N+1] int32, on the tensors' device
    cu_seqlens_k: torch.Tensor  # [N+1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    host_cu_seqlens_q: list[int]
    host_cu_seqlens_k: list[int]
    # True when all query segments share one length and all key segments another (a pack of equal-size
    # images): a backend may then run the segments as one batch. A bool, not the lengths: compiled code
    # reads the lengths off the tensor shapes and keeps one graph for all such packs.
    equal: bool = False
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)  # per-pack state a backend may keep

    @classmethod
    def from_host(cls, cu_q: list[int], cu_k: list[int], device: torch.device | str) -> VarlenParams:
        lengths_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
        lengths_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
        equal = (bool(lengths_q) and cu_q[0] == 0 and cu_k[0] == 0 and min(lengths_q) > 0 and min(lengths_k) > 0
                 and len(set(lengths_q)) == 1 and len(set(lengths_k)) == 1)
        return cls(
            cu_seqlens_q=_on_device(cu_q, device),
            cu_seqlens_k=_on_device(cu_k, device),
            max_seqlen_q=max(lengths_q, default=0),
            max_seqlen_k=max(lengths_k, default=0),
            host_cu_seqlens_q=list(cu_q),
            host_cu_seqlens_k=list(cu_k),
            equal=equal,
        )

    @property
    def num_segments(self) -> int:
        return len(self.host_cu_seqlens_q) - 1


def _on_device(values: list[int], device: torch.device | str) -> torch.Tensor:
    """An int32 tensor of ``values`` on ``device``; to a GPU through page-locked memory, so the copy does not
    make the host wait for the GPU's queue to drain."""
    tensor = torch.tensor(values, dtype=torch.int32)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
