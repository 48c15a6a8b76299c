"""Gradient reduction after ``backward()`` for a model trained without megatron's DDP wrapper.

What each parallel dimension needs (megatron's ``DistributedDataParallel`` + ``finalize_model_grads``
do the same when the model's TransformerConfig is used; this is the plain-autograd equivalent):

- data parallel: average over the DP group (each DP rank saw a different micro-batch);
- context parallel: SUM over the CP group (each CP rank saw part of every sample's tokens; the
  per-rank loss is its real-token sum over the GLOBAL normaliser, see :mod:`dfmkit.parallel.context`);
- tensor parallel: parameters replicated on every TP rank whose gradient is a partial sum there —
  the per-head q/k RMSNorm weights, which each rank applies to its own heads (named ``q_layernorm``/
  ``k_layernorm`` as in megatron, which sums them when ``config.qk_layernorm``), and any parameter
  tagged ``sequence_parallel = True`` — are summed over the TP group. Everything else is either
  TP-sharded or already identical on every TP rank. (Sequence parallelism adds nothing here: the DiT
  all-reduces its per-sample modulation gradients inside the model.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_tensor_parallel_partial(name: str, param: torch.nn.Parameter) -> bool:
    """True for a parameter replicated on TP ranks whose gradient must be summed over the TP group."""
    return bool(getattr(param, "sequence_parallel", False)) or "q_layernorm" in name or "k_layernorm" in name


def _all_reduce(grads: list[torch.Tensor], group, op, scale: float = 1.0) -> None:
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat, op=op, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for grad, synced in zip(grads, flat.split([grad.numel() for grad in grads])):
        grad.copy_(synced.view_as(grad))


def reduce_gradients(model: torch.nn.Module) -> None:
    """Make every rank's ``param.grad`` the gradient of the full (global-batch) loss; see the module docstring."""
    from megatron.core import parallel_state as ps

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    if ps.get_tensor_model_parallel_world_size() > 1:
        partial = [p.grad for n, p in named if is_tensor_parallel_partial(n, p)]
        _all_reduce(partial, ps.get_tensor_model_parallel_group(), dist.ReduceOp.SUM)
    grads = [p.grad for _, p in named]
    if ps.get_context_parallel_world_size() > 1:
        _all_reduce(grads, ps.get_context_parallel_group(), dist.ReduceOp.SUM)
    dp = ps.get_data_parallel_world_size()
    if dp > 1:
        _all_reduce(grads, ps.get_data_parallel_group(), dist.ReduceOp.SUM, scale=1.0 / dp)
