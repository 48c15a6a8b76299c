"""Which torch device a ``device`` option names ("auto", "cpu" or "cuda"), and which dtype a ``precision`` option
names ("auto", "bf16" or "fp32") on it, or one clear error."""

from __future__ import annotations

import torch

from dfmkit.errors import DfmkitError


class DeviceError(DfmkitError):
    """A device option that names no device, or a GPU that is not there."""


def resolve_device(device: str | torch.device, option: str = "device", fix: str = "use 'auto' or 'cpu'") -> torch.device:
    """"auto": the current CUDA device when there is a GPU, else the CPU. ``option`` and ``fix`` word the
    error (for example ``"train.device"`` and ``"use train.device=cpu"``)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{option} = 'cuda' but no GPU is visible; {fix}")
        return torch.device("cuda", torch.cuda.current_device())
    if device != "cpu":
        raise DeviceError(f"{option} must be auto, cpu or cuda, got {device!r}")
    return torch.device("cpu")


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: torch.device, option: str = "precision") -> torch.dtype:
    """The model's dtype for a ``precision`` option on ``device``: "auto" is bf16 on a GPU and fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise DeviceError(f"{option} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32
