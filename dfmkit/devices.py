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


CGROUP_MOUNT = Path("/sys/fs/cgroup")
CGROUP_NO_LIMIT = 2**62  # cgroup v1 writes "no limit" as 2**63 - 1 rounded down to a page


def host_available() -> int | None:
    """Bytes of host memory available to a new allocation: MemAvailable (``os.sysconf`` where there is no
    /proc/meminfo), or less where this process's memory cgroup (a container's limit) allows less; None where
    neither can be read."""
    known = [figure for figure in (_machine_available(), cgroup_memory_room()) if figure is not None]
    return min(known) if known else None


def _machine_available() -> int | None:
    """MemAvailable of /proc/meminfo, else ``os.sysconf``'s available pages, else None."""
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


def cgroup_memory_room(proc_cgroup: Path = Path("/proc/self/cgroup"), mount: Path = CGROUP_MOUNT) -> int | None:
    """Bytes this process's memory cgroup and its ancestors still allow (cgroup v2 or v1): the smallest limit minus
    usage, inactive page cache counted as free (the kernel reclaims it first); None where no limit is set or none
    can be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        parts = line.split(":", 2)  # hierarchy id : controllers : path
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one hierarchy
            base, files = mount, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            base, files = mount / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        directory = base / path.strip("/")
        while True:  # a container may see its cgroup at the mount's root, or only the path's ancestors
            room = _cgroup_room(directory, *files)
            if room is not None:
                rooms.append(room)
            if directory == base or base not in directory.parents:
                break
            directory = directory.parent
    return min(rooms) if rooms else None


def _cgroup_room(directory: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        limit = (directory / limit_file).read_text().strip()
        usage = int((directory / usage_file).read_text())
        if limit == "max" or int(limit) >= CGROUP_NO_LIMIT:
            return None
        limit_bytes = int(limit)
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        pass
    return max(0, limit_bytes - usage + inactive)


def device_available(device: torch.device) -> int | None:
    """Bytes a new allocation can take on a GPU: its free memory and what torch's caching allocator holds unused."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
