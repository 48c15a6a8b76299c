"""What every text-encoder component provides: captions -> per-token states at their true length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from dfmkit.components.tokenizers.base import MissingArtifactError

__all__ = ["MissingArtifactError", "TextEncoder"]


@runtime_checkable
class TextEncoder(Protocol):
    """Encodes captions to the states the backbone cross-attends to.

    ``encode`` returns one tensor ``[L_i, dim]`` per text, at its TRUE length: no padding states.
    ``L_i >= 1`` (an empty caption still has its end-of-sequence token) and ``L_i <= max_length``
    (longer captions are truncated, and the returned length is the truncated one). Tensors are on
    the CPU, float32 unless the encoder's options ask for bf16; treat them as read-only (caches
    hand out the same tensor twice). ``identity`` is a stable string naming everything that
    changes the states (model, dtype, max length): caches key on ``(identity, text)``.
    """

    dim: int
    identity: str

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]: ...
