"""Shared pieces of the DiT tests: a tiny model, packs of different samples, deterministic weights, and the
multi-process worker of the parallel parity tests (run through torch.multiprocessing.spawn, gloo, CPU)."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
import zlib

import torch
import torch.distributed as dist

from dfmkit.batch import PackedBatch, Sample, pack
from dfmkit.components.backbones.options import DiTOptions
from dfmkit.parallel.context import shard_index

TEXT_DIM = 24
CHANNELS = 4
PAD = 8  # a multiple of every layout's required_pad_multiple (2 * CP * TP with SP, at most 8 here)


def tiny_options(**overrides) -> DiTOptions:
    values = dict(preset="tiny", in_channels=CHANNELS, text_dim=TEXT_DIM, adaln_lora_rank=16, attention="torch")
    values.update(overrides)
    return DiTOptions(**values)


def make_samples(seed: int, shapes, text_lengths) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    return [
        Sample(torch.randn(CHANNELS, *shape, generator=g), torch.randn(n, TEXT_DIM, generator=g), key=f"s{seed}-{i}")
        for i, (shape, n) in enumerate(zip(shapes, text_lengths))
    ]


# Two packs (one per data-parallel rank): images and videos of different sizes, different text lengths.
PACK_SPECS = [
    (11, [(1, 6, 8), (3, 4, 4), (1, 2, 6), (2, 2, 2)], [5, 9, 1, 3]),
    (12, [(2, 4, 6), (1, 4, 4), (1, 6, 2)], [7, 2, 4]),
]


def make_packs(pad_multiple: int = PAD) -> list[PackedBatch]:
    return [pack(make_samples(seed, shapes, texts), 2, 1, pad_multiple=pad_multiple) for seed, shapes, texts in PACK_SPECS]


def pack_inputs(batch: PackedBatch, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, c_noise, target) for a full pack, deterministic."""
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(batch.latents.shape, generator=g)
    c_noise = torch.randn(batch.num_samples, generator=g)
    target = torch.randn(batch.latents.shape, generator=g)
    return x, c_noise, target


def randomize_(model: torch.nn.Module, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Overwrite every parameter with a value that depends only on its name and FULL shape, then keep this
    TP rank's slice: the same model for every layout, and no zero-initialised (gradient-free) layer."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = list(param.shape)
            dim = getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else -1
            if dim >= 0:
                shape[dim] *= tp_size
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            full = torch.randn(shape, generator=g)
            if "layernorm" in name:
                full = 1.0 + 0.1 * full
            elif full.ndim == 1:
                full = 0.1 * full
            else:
                full = full * (0.7 / math.sqrt(shape[1]))
            if dim >= 0:
                full = full.chunk(tp_size, dim=dim)[tp_rank]
            param.copy_(full)


def masked_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """Sum over real tokens of the squared error, over the GLOBAL count of real tokens (exact under CP sums)."""
    return ((out - target) ** 2).sum(-1)[mask].sum() / count


def reference(options: DiTOptions, packs: list[PackedBatch]) -> dict:
    """Single-process loss (mean over packs), gradients (mean over packs) and outputs."""
    from dfmkit.components.backbones import dit

    model = dit.build(options)
    randomize_(model)
    losses, outputs = [], []
    for seed, batch in enumerate(packs):
        x, c_noise, target = pack_inputs(batch, seed)
        out = model(x, c_noise, batch)
        loss = masked_loss(out, target, batch.token_mask(), int(batch.seqlens.sum())) / len(packs)
        loss.backward()
        losses.append(loss.detach())
        outputs.append(out.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"loss": sum(losses), "grads": grads, "outputs": outputs}


# --------------------------------------------------------------------------------------------
# The multi-process side
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient with tensor-parallel shards concatenated along their partition dim."""
    from megatron.core import parallel_state as ps

    tp_group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if tp > 1 and getattr(param, "tensor_model_parallel", False):
            pieces = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(pieces, grad.contiguous(), group=tp_group)
            grad = torch.cat(pieces, dim=param.partition_dim)
        grads[name] = grad.clone()
    return grads


# With overlapped reduction: megatron's buckets of this many elements split the tiny model's layer groups
OVERLAP_BUCKET = 4000


@contextlib.contextmanager
def counting_reductions(ddp):
    """Within it, counts megatron's bucket reductions started and the gradients of their parameters that ``ddp()``
    (a BatchedAccumulationDDP) still kept at that moment, not yet in ``main_grad``."""
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

    counts = {"started": 0, "kept": 0}
    start = _ParamAndGradBucketGroup.start_grad_sync

    def counted(bucket_group, *args, **kwargs):
        kept = {param for pairs in ddp()._kept.values() for param, _ in pairs}
        counts["started"] += 1
        counts["kept"] += len(kept & bucket_group.params)
        return start(bucket_group, *args, **kwargs)

    _ParamAndGradBucketGroup.start_grad_sync = counted
    try:
        yield counts
    finally:
        _ParamAndGradBucketGroup.start_grad_sync = start


def run_layout(options: DiTOptions, tensor: int, sequence: bool, context: int, outdir: str, name: str,
               ddp: bool = False, overlap: bool = False) -> None:
    """One layout's forward and backward on this rank's pack shard; rank 0 saves loss and full gradients.

    ``ddp``: reduce gradients the way the training loop does, with its megatron DistributedDataParallel and
    finalize_model_grads, which SUM over data x context (the DiT's config sets calculate_per_token_loss), so
    each rank's loss is divided by DP to average the packs, instead of :func:`dfmkit.parallel.reduce_gradients`.
    ``overlap``: with it, megatron's ``overlap_grad_reduce`` and small buckets, so the batched accumulation adds the
    gradients of layer groups split by a bucket boundary before that bucket's reduction starts; rank 0 also saves
    how many groups were split and how many gradients were still kept as each bucket's reduction started.
    """
    with contextlib.ExitStack() as stack:
        _run_layout(options, tensor, sequence, context, outdir, name, ddp, overlap, stack)


def _run_layout(options: DiTOptions, tensor: int, sequence: bool, context: int, outdir: str, name: str,
                ddp: bool, overlap: bool, stack: contextlib.ExitStack) -> None:
    """:func:`run_layout`; the reduction counter of ``overlap`` stays installed until ``stack`` closes."""
    from megatron.core import parallel_state as ps

    from dfmkit.components.backbones import dit
    from dfmkit.parallel import (
        gather_from_context_parallel,
        initialize,
        reduce_gradients,
        required_pad_multiple,
        shard_for_context_parallel,
    )
    from dfmkit.recipe import ParallelConfig

    parallel = ParallelConfig(tensor=tensor, sequence=sequence, context=context)
    assert PAD % required_pad_multiple(parallel) == 0
    layout = initialize(parallel, seed=1234)
    model = dit.build(options, parallel=parallel)
    randomize_(model, layout.tp_rank, layout.tp_size)
    module = model
    if ddp:
        from megatron.core.distributed import DistributedDataParallelConfig

        from dfmkit.compat.megatron_ddp import BatchedAccumulationDDP

        config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                               bucket_size=OVERLAP_BUCKET if overlap else None)
        if overlap:
            reductions = stack.enter_context(counting_reductions(lambda: model))
        model = BatchedAccumulationDDP(model.config, config, model)

    packs = make_packs()
    seed = layout.dp_rank
    batch = packs[seed]
    x, c_noise, target = pack_inputs(batch, seed)
    shard, x = shard_for_context_parallel(batch, x, layout)
    if layout.cp_size > 1:
        target = target[shard_index(batch.cu_seqlens.tolist(), layout.cp_size, layout.cp_rank)]
    if overlap:  # megatron overlaps the reductions from the second backward on: the first one learns their order
        from megatron.core.distributed import finalize_model_grads

        warm_up = masked_loss(model(x, c_noise, shard), target, shard.token_mask(), int(batch.seqlens.sum()))
        (warm_up / layout.dp_size).backward()
        finalize_model_grads([model])
        model.zero_grad_buffer()
        reductions.update(started=0, kept=0)
    out = model(x, c_noise, shard)
    loss = masked_loss(out, target, shard.token_mask(), int(batch.seqlens.sum()))
    if ddp:
        from megatron.core.distributed import finalize_model_grads

        (loss / layout.dp_size).backward()
        finalize_model_grads([model])
        for param in module.parameters():
            param.grad = param.main_grad
    else:
        loss.backward()
        reduce_gradients(model)

    total = loss.detach().clone()
    dist.all_reduce(total)  # sums CP pieces and DP packs, counted once per TP rank
    total /= layout.tp_size * layout.dp_size
    grads = full_gradients(module)
    full_out = gather_from_context_parallel(out.detach(), shard)
    if layout.tp_rank == 0 and layout.cp_rank == 0:
        torch.save(full_out, os.path.join(outdir, f"{name}-out{layout.dp_rank}.pt"))
    if layout.rank == 0:
        saved = {"loss": total, "grads": grads}
        if overlap:
            saved["split_groups"] = sum(len({model.param_to_bucket_group[p] for p in params}) > 1
                                        for params in model._groups.values())
            saved["reductions"] = reductions
        torch.save(saved, os.path.join(outdir, f"{name}.pt"))
    dist.barrier()
    ps.destroy_model_parallel()


def worker(rank: int, world: int, port: int, outdir: str, layouts: list[tuple[str, dict, dict]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        for name, parallel, option_overrides in layouts:
            run_layout(tiny_options(**option_overrides), outdir=outdir, name=name, **parallel)
    finally:
        dist.destroy_process_group()
