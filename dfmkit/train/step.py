"""The gradients of one training step: each micro-batch's noise draw, its context-parallel shard, the objective's loss and
the backward, then the sums over the ranks that leave the optimizer gradients to divide by the global count.

The Trainer's step (:mod:`dfmkit.train.loop`) and the parallel parity tests (tests/test_parallel.py) run this code;
validation shards its batches with :func:`shard_draw`.

The loss of a step is the mean over every sample of the global batch (or over every real token, with
``diffusion.loss_normalization = "token"``): each rank back-propagates the sum of its share
(:func:`dfmkit.diffusion.objective.loss_share`), megatron's ``finalize_model_grads`` sums the gradients over the ranks,
and the optimizer divides them by the global count as it reads them. (Passing ``num_tokens`` to
``finalize_model_grads`` would divide them first, reading the count to the host, in a pass of its own.)

Randomness of a micro-batch (noise levels, noise, condition dropout) comes from a generator seeded with (seed,
step, micro-batch, data-parallel rank), so a resumed run draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
import torch.distributed as dist

from dfmkit import parallel
from dfmkit.batch import PackedBatch
from dfmkit.diffusion.objective import NoiseDraw, Objective, as_model_fn, loss_share
from dfmkit.parallel import ParallelLayout
from dfmkit.train.optim import main_grad_norm
from dfmkit.train.state import TrainState


def step_generator(seed: int, step: int, micro: int, dp_rank: int,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one micro-batch's random draws: a pure function of its position in the run.

    On the training device, so the noise is drawn where it is used (drawing a 32k-token pack's noise on
    the CPU took 14 ms per step, with the GPU waiting); a GPU run therefore draws other numbers than a CPU run."""
    return torch.Generator(device=device).manual_seed(hash((seed, step, micro, dp_rank)) & 0x7FFF_FFFF_FFFF_FFFF)


def shard_draw(batch: PackedBatch, draw: NoiseDraw, env: ParallelLayout,
               device: torch.device) -> tuple[PackedBatch, NoiseDraw]:
    """This rank's context-parallel shard of ``batch`` and of its noise draw, on ``device``."""
    local_batch, local_noise = parallel.shard_for_context_parallel(batch, draw.noise, env)
    local_draw = attrs.evolve(draw, noise=local_noise.to(device), sigma=draw.sigma.to(device),
                              keep_text=draw.keep_text.to(device))
    return local_batch.to(device), local_draw


@attrs.frozen
class StepGradients:
    """What :func:`compute_gradients` leaves besides the gradients, as device tensors (read without a host sync)."""

    loss_total: torch.Tensor  # the global batch's loss total (sum over the ranks' shares)
    count: torch.Tensor  # the global count (samples or real tokens), at least 1: the loss is loss_total / count
    grad_norm: torch.Tensor  # the L2 norm of the gradients divided by count


def compute_gradients(state: TrainState, objective: Objective, batches: Sequence[PackedBatch],
                      generators: Sequence[torch.Generator], *, env: ParallelLayout, device: torch.device,
                      model_dtype: torch.dtype) -> StepGradients:
    """Forward and backward of this rank's micro-batches (``batches[i]`` drawn with ``generators[i]``), then the
    gradients summed over all ranks into the optimizer's gradients (megatron's ``main_grad``), still to be divided
    by the global count: ``step_on_device(..., grad_divisor=count)`` does that as it steps."""
    from megatron.core.distributed import finalize_model_grads

    state.ddp.zero_grad_buffer()
    state.optimizer.zero_grad()
    model_fn = as_model_fn(state.ddp, device, model_dtype)
    loss_total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for batch, generator in zip(batches, generators, strict=True):
        batch = batch.to(device)  # the draw then happens on the device, with the device's generator
        local_batch, local_draw = shard_draw(batch, objective.draw(batch, generator), env, device)
        terms = objective.loss_terms(model_fn, local_batch, local_draw, model_dtype)
        share = loss_share(terms, objective.loss_normalization, env)
        share.total.backward()
        loss_total += share.total.detach()
        count += share.count
    group = parallel.data_and_context_group(env)
    dist.all_reduce(loss_total, group=group)
    dist.all_reduce(count, group=group)
    count = count.clamp(min=1)
    finalize_model_grads([state.ddp], num_tokens=None)
    if state.optimizer.prepare_grads():
        raise RuntimeError("megatron's optimizer found non-finite gradients through a loss scaler; dfmkit trains "
                           "in bf16 or fp32, without one")
    return StepGradients(loss_total=loss_total, count=count, grad_norm=main_grad_norm(state.optimizer) / count)
