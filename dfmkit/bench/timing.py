"""GPU time of a piece of work, measured with CUDA events after a warm-up."""

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
