"""GPU time of a piece of work after a warm-up: wall time on the stream (CUDA events), or the summed
device time of the kernels it launches (the profiler; host gaps between launches left out)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cuda_milliseconds(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Mean milliseconds per call of ``fn`` on the current CUDA stream (warm-up calls not counted)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def gpu_kernels(events) -> list:
    """The profiler events that are work on the GPU (kernels, copies, memsets). ``record_function`` ranges
    show on the GPU timeline too; they are not kernels, and counting them would count their kernels twice."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]


def kernel_milliseconds(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Mean milliseconds per call of ``fn`` that its CUDA kernels run, summed (warm-up calls not counted).

    Steadier than :func:`cuda_milliseconds` for work of a few hundred microseconds, whose back-to-back
    timing also holds the host's launch gaps (it varied by half between two runs of one setting)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in gpu_kernels(prof.events())) / 1e3 / repeats


def copy_bandwidth(numel: int = 2**29) -> float:
    """Bytes per second a device-to-device copy of ``numel`` bf16 elements moves (bytes read + written), from its
    kernel's device time: the bandwidth ceiling that bandwidth-bound kernels are held against."""
    src = torch.empty(numel, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / (kernel_milliseconds(lambda: dst.copy_(src)) / 1e3)
