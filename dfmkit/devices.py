"""Which torch device a ``device`` option names ("auto", "cpu" or "cuda"), and which dtype a ``precision`` option
names ("auto", "bf16" or "fp32") on it, or one clear error; and how much memory a new allocation can take there."""

from __future__ import annotations

import os
from pathlib import Path

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


def host_available() -> int | None:
    """Bytes of host memory available to a new allocation (MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_available(device: torch.device) -> int | None:
    """Bytes a new allocation can take on a GPU: its free memory and what torch's caching allocator holds unused."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
