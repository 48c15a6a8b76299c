"""Process groups: torch.distributed and megatron-core ``parallel_state`` from a recipe's ``[parallel]``.

Ranks are laid out as megatron does by default ("tp-cp-ep-dp-pp"): tensor-parallel peers are
neighbours, then context-parallel peers, and data parallelism takes the remaining factor
``world_size / (tensor * context)``. The torch.distributed backend is NCCL on a GPU machine and
gloo on a CPU one (where :mod:`dfmkit.compat.megatron_cpu` is applied first).

A process started without a launcher (no ``RANK``/``WORLD_SIZE`` in the environment) gets a
one-process world whose rendezvous store lives in memory, so single-process training, sampling
and tests run the same code as multi-process ones.
"""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING

import attrs
import torch
import torch.distributed as dist

from dfmkit.compat import megatron_cpu
from dfmkit.errors import DfmkitError

if TYPE_CHECKING:
    from dfmkit.recipe import ParallelConfig


class ParallelError(DfmkitError):
    """A parallel layout that does not fit the processes, the model or the batch."""


@attrs.frozen
class ParallelLayout:
    """Sizes and this process's ranks in each parallel dimension (what :func:`initialize` returns)."""

    world_size: int
    rank: int
    tp_size: int
    cp_size: int
    dp_size: int
    sequence_parallel: bool
    tp_rank: int
    cp_rank: int
    dp_rank: int
    device: torch.device


_created_world = False  # whether initialize() made the torch.distributed world (destroy() then ends it)
_sequence_parallel = False
_device = torch.device("cpu")


def default_backend(device: torch.device | str | None = None) -> str:
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _init_world(backend: str, timeout: datetime.timedelta) -> None:
    global _created_world
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun, srun with the env set, ...
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    _created_world = True


def initialize(
    parallel: ParallelConfig | None = None,
    device: torch.device | str | None = None,
    *,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int = 30,
) -> ParallelLayout:
    """Set up torch.distributed (if not yet) and megatron's parallel_state for ``parallel``.

    ``device`` picks the backend of a world created here (NCCL for CUDA, gloo for CPU; default: CUDA
    when there is a GPU). Idempotent: called again with the same sizes it only reseeds; with other
    sizes it rebuilds the megatron groups over the same world. ``seed`` seeds megatron's RNG tracker
    (:func:`seed_model_parallel`).
    """
    from megatron.core import parallel_state

    tensor = parallel.tensor if parallel is not None else 1
    context = parallel.context if parallel is not None else 1
    sequence = bool(parallel.sequence) if parallel is not None else False
    megatron_cpu.apply()
    if not dist.is_initialized():
        _init_world(backend or default_backend(device), datetime.timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    if world % (tensor * context):
        raise ParallelError(
            f"{world} processes cannot be split into tensor parallelism {tensor} x context parallelism {context}: "
            f"the world size must be a multiple of tensor * context = {tensor * context}"
        )
    if sequence and tensor == 1:
        raise ParallelError("parallel.sequence = true needs parallel.tensor > 1 (it splits tensor-parallel regions)")
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tensor
            and parallel_state.get_context_parallel_world_size() == context
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor,
            context_parallel_size=context,
            distributed_timeout_minutes=timeout_minutes,
        )
    seed_model_parallel(seed)
    global _sequence_parallel, _device
    _sequence_parallel = sequence
    if device is not None:
        _device = torch.device(device)
    elif dist.get_backend() == "nccl":
        _device = torch.device("cuda", torch.cuda.current_device())
    else:
        _device = torch.device("cpu")
    return layout()


def seed_model_parallel(seed: int) -> None:
    """Seed megatron's RNG tracker: the default stream is the same on every rank, the tensor-parallel
    stream (dropout inside TP regions, GPU weight init of TP shards) differs between TP peers."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)


def is_initialized() -> bool:
    from megatron.core import parallel_state

    return dist.is_initialized() and parallel_state.model_parallel_is_initialized()


def ensure_initialized(parallel: ParallelConfig | None = None, *, seed: int | None = None) -> ParallelLayout:
    """The current layout; a one-process world with every size 1 if nothing was set up yet.

    With ``parallel`` given, checks that the groups set up earlier have its sizes.
    """
    if not is_initialized():
        needs_more = parallel is not None and (parallel.tensor > 1 or parallel.context > 1)
        if needs_more and not dist.is_initialized():
            raise ParallelError(
                f"tensor parallelism {parallel.tensor} / context parallelism {parallel.context} need "
                "several processes: launch with torchrun and call dfmkit.parallel.initialize(recipe.parallel) first"
            )
        return initialize(parallel, seed=1234 if seed is None else seed)
    current = layout()
    if parallel is not None and (current.tp_size, current.cp_size) != (parallel.tensor, parallel.context):
        raise ParallelError(
            f"megatron parallel_state was set up with tensor {current.tp_size} x context {current.cp_size}, but the "
            f"recipe asks for tensor {parallel.tensor} x context {parallel.context}; call "
            "dfmkit.parallel.initialize(recipe.parallel) before building the model"
        )
    return current


def layout() -> ParallelLayout:
    """Sizes and ranks of the groups set up by :func:`initialize`."""
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        cp_size=ps.get_context_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        sequence_parallel=_sequence_parallel,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=_device,
    )


def data_parallel_group() -> dist.ProcessGroup:
    """The group of ranks that read different parts of the data (data parallel; tensor and context peers read the
    same)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def data_and_context_group(env: ParallelLayout | None = None) -> dist.ProcessGroup:
    """The group of ranks that hold different tokens of the global batch (data x context parallel)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def all_reduce_context_parallel(tensor: torch.Tensor, env: ParallelLayout | None = None) -> torch.Tensor:
    """Sum ``tensor`` over the context-parallel group in place (a no-op without CP); returns it."""
    from megatron.core import parallel_state as ps

    if ps.get_context_parallel_world_size() > 1:
        dist.all_reduce(tensor, group=ps.get_context_parallel_group())
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    """Tear down megatron's groups, and the torch.distributed world if :func:`initialize` created it."""
    global _created_world
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _created_world and dist.is_initialized():
        dist.destroy_process_group()
    _created_world = False
