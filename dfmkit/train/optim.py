"""AdamW through megatron-core's optimizer, its warm-up + decay schedule, and a step without host syncs."""

from __future__ import annotations

import torch

from dfmkit.errors import RecipeError
from dfmkit.recipe import OptimConfig
from dfmkit.recipe_checks import schedule_problem


def check_schedule(optim: OptimConfig, train_iters: int) -> None:
    """The recipe check again, for a recipe changed after loading (``load_recipe`` reports it first)."""
    problem = schedule_problem(optim, train_iters)
    if problem:
        raise RecipeError([problem])


def torch_adams(optimizer):
    """(megatron optimizer, its torch Adam or AdamW) for each optimizer megatron chains together."""
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(megatron_optimizer, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield megatron_optimizer, inner


def use_fused_adamw(optimizer) -> int:
    """Switch megatron's torch AdamW (its fallback without Apex or TransformerEngine) to the fused kernel.

    torch picks the multi-tensor ``foreach`` AdamW by default; the fused one reads and writes each fp32
    master weight and its moments once per step, and it takes the clipping factor and the skip flag as
    device tensors (:func:`step_on_device`). Only when every parameter of the optimizer is an fp32 tensor
    on one device (CUDA or CPU, which both have the kernel). Returns how many optimizers changed.
    """
    changed = 0
    for _, inner in torch_adams(optimizer):
        if not isinstance(inner, torch.optim.AdamW) or inner.state:
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if params and all(p.dtype == torch.float32 and p.device.type in ("cuda", "cpu") for p in params) \
                and len({p.device for p in params}) == 1:
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False
            inner.defaults["fused"], inner.defaults["foreach"] = True, False
            changed += 1
    return changed


def main_grad_norm(optimizer) -> torch.Tensor:
    """The global L2 norm of the main gradients as a device scalar (megatron's count: no shared and no
    tensor-parallel duplicate gradients, squares summed over the optimizer's statistics group).

    megatron's own ``get_grad_norm_fp32`` returns a Python float, which waits for the whole backward.
    """
    import torch.distributed as dist

    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    grads = [g for o in optimizers for g in o.get_main_grads_for_grad_norm()]
    if grads:
        squares = _sum_of_squares(grads)
    else:  # this rank holds no gradient to count, but takes part in the reduction
        device = next(p for o in optimizers for p in o.get_parameters()).device
        squares = torch.zeros((), dtype=torch.float32, device=device)
    if dist.is_initialized():
        dist.all_reduce(squares, group=optimizer.get_grad_stats_parallel_group())
    return squares.sqrt()


def step_on_device(optimizer, clip_grad: float, grad_norm: torch.Tensor, skip: torch.Tensor,
                   grad_divisor: torch.Tensor | float = 1.0) -> None:
    """megatron's ``optimizer.step()`` with ``prepare_grads()`` done: divide the gradients by
    ``grad_divisor``, clip them to ``clip_grad`` (0: no clipping) by their norm ``grad_norm`` (after the
    division), and leave everything as it is where ``skip`` is 1.

    With torch's fused AdamW (see :func:`use_fused_adamw`) all of it stays on the device and costs no pass
    over the gradients of its own: the kernel divides each gradient by ``grad_scale`` as it reads it and
    does nothing, not even count the step, where ``found_inf`` is 1, so the host never waits for the GPU
    here. Other optimizers (Apex's or TransformerEngine's Adam) read the norm and the flag on the host
    first, as megatron does, and scale the gradients before their step.
    """
    adams = [inner for _, inner in torch_adams(optimizer)]
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    fused = all(group.get("fused") for inner in adams for group in inner.param_groups)
    if adams and len(adams) == len(optimizers) and fused:
        grad_scale = torch.as_tensor(grad_divisor, dtype=torch.float32, device=grad_norm.device)
        if clip_grad > 0:
            grad_scale = grad_scale * ((grad_norm + 1e-6) / clip_grad).clamp(min=1.0)
        for inner in adams:
            inner.grad_scale, inner.found_inf = grad_scale, skip.float()
        try:
            optimizer.step_with_ready_grads()
        finally:
            for inner in adams:
                del inner.grad_scale, inner.found_inf
        return
    if bool(skip):
        return
    factor = min(1.0, clip_grad / (float(grad_norm) + 1e-6)) if clip_grad > 0 else 1.0
    factor /= float(grad_divisor)
    if factor != 1.0:
        torch._foreach_mul_([p.grad for o in optimizers for p in o.get_parameters() if p.grad is not None], factor)
    optimizer.step_with_ready_grads()


def _sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The fp32 sum of the squares of all elements of ``tensors`` (any precisions), on torch's multi-tensor kernels."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square().sum()


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's ``multi_tensor_l2norm`` on torch's multi-tensor kernels: ``([total norm], None)``."""
    return _sum_of_squares(tensor_lists[0]).sqrt().reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """megatron's ``multi_tensor_scale``: ``destination = source * scale`` for each pair of tensors."""
    sources, destinations = tensor_lists
    if all(s is d for s, d in zip(sources, destinations)):
        torch._foreach_mul_(destinations, scale)
    else:
        torch._foreach_copy_(destinations, sources if scale == 1.0 else torch._foreach_mul(sources, scale))


def use_foreach_multi_tensor_ops() -> bool:
    """Give megatron-core torch's multi-tensor kernels where it would use its own fallbacks.

    Without Apex or TransformerEngine, megatron's gradient norm (``optimizer.get_grad_norm()``; dfmkit's
    step uses :func:`main_grad_norm` instead) takes one ``torch.norm`` per parameter and then builds a
    tensor from the list, which reads each norm back to the host: about 380 host syncs for DiT-XL. Its
    scaling fallback, which its fp16/bf16 optimizer copies through, launches two kernels per tensor.
    Returns True if anything was replaced (the fallbacks were in use); with Apex or TransformerEngine
    installed nothing changes.
    """
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer

    replaced = False
    if getattr(clip_grads, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
        replaced = True
    for module in (clip_grads, megatron_optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _foreach_scale
            replaced = True
    return replaced


def copy_main_params_with_foreach(optimizer) -> int:
    """Make megatron's distributed optimizer copy its fp32 master weights into the model's weights with one
    multi-tensor copy per group instead of a ``copy_`` per parameter (374 kernel launches a step for DiT-XL).
    For its plain layout (not FSDP, FP8 or precision-aware); returns how many optimizers changed."""
    changed = 0
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(megatron_optimizer, "shard_fp32_from_float16_groups"):
            continue
        from megatron.core.fp8_utils import is_float8tensor

        config, ddp_config = megatron_optimizer.config, megatron_optimizer.ddp_config
        model_params = [p for groups in (megatron_optimizer.model_float16_groups, megatron_optimizer.model_fp32_groups)
                        for group in groups for p in group]
        if ddp_config.use_megatron_fsdp or getattr(config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False) \
                or any(is_float8tensor(p) for p in model_params):
            continue

        def copy_main_params_to_model_params(opt=megatron_optimizer):
            if opt.is_stub_optimizer:
                return
            destinations, sources = [], []
            for main_groups, model_groups in ((opt.shard_fp32_from_float16_groups, opt.model_float16_groups),
                                              (opt.shard_fp32_groups, opt.model_fp32_groups)):
                for main_group, model_group in zip(main_groups, model_groups):
                    for main_param, model_param in zip(main_group, model_group):
                        world_range = opt._get_model_param_range_map(model_param)["gbuf_world_in_bucket"]
                        gbuf_index, _, bucket_id = opt.model_param_gbuf_map[model_param]
                        bucket_data = opt.buffers[gbuf_index].buckets[bucket_id].param_data
                        destinations.append(bucket_data.view(-1)[world_range.start : world_range.end])
                        sources.append(main_param.view(-1))
            if destinations:
                torch._foreach_copy_(destinations, sources)

        megatron_optimizer._copy_main_params_to_model_params = copy_main_params_to_model_params
        changed += 1
    return changed


# megatron-core 0.16's distributed optimizer cannot load a checkpoint into torch's Adam(W) (its fallback
# without Apex or TransformerEngine) as it stands; the two functions below make it work.


def fill_empty_adam_state(optimizer) -> None:
    """Give a fresh torch Adam(W) the state it would have after a step (step count and both moments,
    zero), so a checkpoint can be loaded into it: megatron's distributed optimizer reads the step count
    of the state it is about to replace, and a torch Adam creates its state only on its first step."""
    for _, inner in torch_adams(optimizer):
        for group in inner.param_groups:
            on_device = bool(group.get("fused") or group.get("capturable"))
            for param in group["params"]:
                state = inner.state[param]
                if state:
                    continue
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def load_parameter_state_without_step(optimizer) -> None:
    """Make megatron's distributed optimizer copy only the saved keys into a torch Adam(W)'s state.

    megatron first gives every torch Adam state its "step" and then copies the saved tensors into ALL
    state keys, "step" included, although the saved parameter state has no "step" (it lives in the param
    groups): every GPU resume failed with KeyError 'step'. For the plain (not precision-aware) layout.
    """
    for megatron_optimizer, inner in torch_adams(optimizer):
        if not hasattr(megatron_optimizer, "_set_main_param_and_optimizer_states"):
            continue
        if getattr(megatron_optimizer.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            continue

        def set_states(model_param, tensors, megatron_optimizer=megatron_optimizer, inner=inner):
            group_index, group_order = megatron_optimizer.model_param_group_index_map[model_param]
            main_param = inner.param_groups[group_index]["params"][group_order]
            destination = {"param": main_param, **inner.state[main_param]}
            for key, value in tensors.items():
                destination[key].copy_(value)

        megatron_optimizer._set_main_param_and_optimizer_states = set_states


def build_optimizer(optim: OptimConfig, train_iters: int, model_chunks: list, bf16: bool, distributed: bool):
    """megatron's AdamW (no weight decay on biases and 1-D parameters such as norms) and its scheduler.

    With ``bf16`` the model holds bf16 weights and the optimizer keeps fp32 master weights.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    check_schedule(optim, train_iters)
    use_foreach_multi_tensor_ops()
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.lr * optim.min_lr_ratio,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    use_fused_adamw(optimizer)
    copy_main_params_with_foreach(optimizer)
    load_parameter_state_without_step(optimizer)
    decay_style = {"cosine": "cosine", "linear": "linear", "constant": "constant"}[optim.decay_style]
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.lr * optim.min_lr_ratio if decay_style != "constant" else optim.lr,
        lr_warmup_steps=optim.warmup_iters,
        lr_decay_steps=train_iters,
        lr_decay_style=decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
