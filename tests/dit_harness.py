"""Shared pieces of the DiT tests: a tiny model, packs of different samples, deterministic weights, and one training
step through the Trainer's code for the parallel parity tests (:func:`trainer_step`, in this process and in the
multi-process :func:`worker`, gloo, CPU)."""

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


def sampling_model(device: str, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """The tiny DiT on ``device`` with the weights of :func:`randomize_`, in ``dtype`` and eval mode, as sampling
    runs it."""
    from dfmkit.components.backbones import dit

    model = dit.build(tiny_options(**overrides), device=device)
    randomize_(model)
    return model.to(dtype).eval()


def parity_recipe(parallel: dict, model: dict, diffusion: dict, packs: int) -> dict:
    """The recipe of a parity run: the tiny model with ``model`` options, ``parallel`` sizes, and a global batch of
    ``packs`` packs (one per data-parallel rank)."""
    return {
        "model": {"name": "dit", "preset": "tiny", "in_channels": CHANNELS, "text_dim": TEXT_DIM,
                  "adaln_lora_rank": 16, "attention": "torch", **model},
        "parallel": parallel,
        "diffusion": diffusion,
        "text_encoder": {"name": "t5-tiny"},
        "data": {"mock": True, "seq_length": 256},
        "train": {"train_iters": 10, "global_batch_size": packs, "seed": 7},
        "optim": {"warmup_iters": 1},
        "validation": {"interval": 0},
    }


def trainer_step(recipe: dict, packs: list[PackedBatch], overlap: bool = False) -> dict:
    """The gradients of one training step through the Trainer's code, on this rank (call on every rank).

    The state is built as the Trainer builds it (:func:`dfmkit.train.state.build_train_state`: the model, megatron's
    DDP with the batched accumulation, the optimizer), its weights then set by :func:`randomize_`;
    :func:`dfmkit.train.step.compute_gradients` runs this rank's micro-batches (the noise drawn on the whole pack,
    the load-balanced context-parallel shard, the recipe's objective's loss and
    :func:`dfmkit.diffusion.objective.loss_share`, backward,
    megatron's ``finalize_model_grads``) and the gradients are divided by the global count, as the optimizer does.
    Pack ``i`` of the global batch is drawn with the generator the one-process run uses for it (micro-batch ``i``).

    ``overlap``: megatron's overlapped reduction with small buckets (on GPUs the Trainer overlaps; megatron starts
    the overlapped reductions from the second backward on, so a first step runs before the one measured); the
    result then also holds how many layer groups a bucket boundary split and the count of the reductions started
    and of the gradients still kept as each started (:func:`counting_reductions`).

    Returns the loss, the count, the gradient norm and every parameter's full gradient (TP shards gathered), and
    the full model output of each of this rank's packs by its index in the global batch.
    """
    import dataclasses

    import dfmkit
    from dfmkit import parallel
    from dfmkit.train.setup import micro_batches_per_rank
    from dfmkit.train.state import build_train_state, training_ddp_config
    from dfmkit.train.step import compute_gradients, step_generator

    job = dfmkit.build(recipe)
    device = torch.device("cpu")
    env = parallel.initialize(job.recipe.parallel, device)
    assert PAD % parallel.required_pad_multiple(job.recipe.parallel) == 0
    micro = micro_batches_per_rank(job.recipe.train, env)
    indices = range(env.dp_rank * micro, (env.dp_rank + 1) * micro)
    ddp_config = training_ddp_config(job.recipe.parallel, env, device)
    if overlap:
        ddp_config = dataclasses.replace(ddp_config, overlap_grad_reduce=True, bucket_size=OVERLAP_BUCKET)
    with contextlib.ExitStack() as stack:
        if overlap:
            reductions = stack.enter_context(counting_reductions(lambda: state.ddp))
        state = build_train_state(job, job.recipe, env, device, torch.float32, ddp_config=ddp_config)
        randomize_(state.model, env.tp_rank, env.tp_size)
        outputs = []
        stack.enter_context(state.model.register_forward_hook(
            lambda _, args, out: outputs.append(parallel.gather_from_context_parallel(out.detach(), args[2]))))
        objective = job.components["diffusion"].build(recipe=job.recipe)

        def step():
            generators = [step_generator(job.recipe.train.seed, 0, i, 0) for i in indices]
            return compute_gradients(state, objective, [packs[i] for i in indices], generators, env=env, device=device,
                                     model_dtype=torch.float32)

        if overlap:
            step()
            reductions.update(started=0, kept=0)
            outputs.clear()
        grads = step()
        result = {
            "loss": grads.loss_total / grads.count, "count": grads.count, "grad_norm": grads.grad_norm,
            "grads": full_gradients(state.model, lambda p: p.main_grad / grads.count),
            "outputs": dict(zip(indices, outputs, strict=True)),
        }
        if overlap:
            result["split_groups"] = sum(len({state.ddp.param_to_bucket_group[p] for p in params}) > 1
                                         for params in state.ddp._groups.values())
            result["reductions"] = dict(reductions)
    return result


# --------------------------------------------------------------------------------------------
# The multi-process side
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def full_gradients(model: torch.nn.Module, gradient) -> dict[str, torch.Tensor]:
    """``gradient(param)`` of every parameter with tensor-parallel shards concatenated along their partition dim."""
    from megatron.core import parallel_state as ps

    tp_group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    grads = {}
    for name, param in model.named_parameters():
        grad = gradient(param)
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


def worker(rank: int, world: int, port: int, outdir: str, layouts: list[tuple[str, dict, bool]]) -> None:
    """Run :func:`trainer_step` for each ``(name, recipe, overlap)`` in turn; each rank saves ``<name>-rank<r>.pt``
    (loss, count, gradient norm, gradients, overlap figures), and the first rank of each data-parallel group
    ``<name>-out<i>.pt``, the model output for pack ``i``."""
    from megatron.core import parallel_state as ps

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        packs = make_packs()
        for name, recipe, overlap in layouts:
            result = trainer_step(recipe, packs, overlap)
            outputs = result.pop("outputs")
            if ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
                for index, out in outputs.items():
                    torch.save(out, os.path.join(outdir, f"{name}-out{index}.pt"))
            torch.save(result, os.path.join(outdir, f"{name}-rank{rank}.pt"))
            dist.barrier()
            ps.destroy_model_parallel()
    finally:
        dist.destroy_process_group()
