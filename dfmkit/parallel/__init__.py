"""Parallelism: megatron-core process groups and context-parallel packing.

- :func:`initialize` / :func:`destroy`: torch.distributed (NCCL on GPU, gloo on CPU) and megatron's
  parallel_state from a recipe's ``[parallel]`` (tensor, sequence, context; data = the rest).
- :func:`split_for_context_parallel` (:func:`shard_for_context_parallel` with a per-token tensor) /
  :func:`gather_from_context_parallel`: a packed batch per CP rank and back; :func:`required_pad_multiple`
  is what the data pipeline pads each sample to.
- :func:`all_reduce_context_parallel`, :func:`data_and_context_group`, :func:`barrier`: the reductions a
  loss needs; :func:`data_parallel_group`: the ranks that read different parts of the data.

Gradients are reduced by megatron's DDP and ``finalize_model_grads``, as the trainer builds them
(:mod:`dfmkit.train.state`, :mod:`dfmkit.train.step`).

megatron is adapted to CPU-only machines (gloo runs) in :mod:`dfmkit.compat.megatron_cpu`, which
:func:`initialize` applies when there is no GPU.
"""

from dfmkit.parallel.context import (
    ContextParallelBatch,
    gather_from_context_parallel,
    required_pad_multiple,
    shard_for_context_parallel,
    split_for_context_parallel,
)
from dfmkit.parallel.state import (
    ParallelError,
    ParallelLayout,
    all_reduce_context_parallel,
    barrier,
    data_and_context_group,
    data_parallel_group,
    destroy,
    ensure_initialized,
    initialize,
    is_initialized,
    layout,
    seed_model_parallel,
)

__all__ = [
    "ContextParallelBatch",
    "ParallelError",
    "ParallelLayout",
    "all_reduce_context_parallel",
    "barrier",
    "data_and_context_group",
    "data_parallel_group",
    "destroy",
    "ensure_initialized",
    "gather_from_context_parallel",
    "initialize",
    "is_initialized",
    "layout",
    "required_pad_multiple",
    "seed_model_parallel",
    "shard_for_context_parallel",
    "split_for_context_parallel",
]
