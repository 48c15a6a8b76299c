"""AdamW through megatron-core's optimizer, its warm-up + decay schedule, and a step without host syncs.

What dfmkit changes inside megatron's optimizer (torch's multi-tensor kernels for its fallbacks, the master-weight
copy, loading a checkpoint into torch's Adam) lives in :mod:`dfmkit.compat.megatron_optimizer`, and the fused
AdamW's gradient-scale protocol in :mod:`dfmkit.compat.torch_optim`; this module builds the optimizer with them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dfmkit.compat.megatron_optimizer import (
    copy_main_params_with_foreach,
    load_parameter_state_without_step,
    sum_of_squares,
    torch_adams,
    use_foreach_multi_tensor_ops,
)
from dfmkit.compat.torch_optim import fused_step_scaling
from dfmkit.errors import RecipeError
from dfmkit.recipe import OptimConfig
from dfmkit.recipe_checks import schedule_problem


def check_schedule(optim: OptimConfig, train_iters: int) -> None:
    """The recipe check again, for a recipe changed after loading (``load_recipe`` reports it first)."""
    problem = schedule_problem(optim, train_iters)
    if problem:
        raise RecipeError([problem])


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
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    grads = [g for o in optimizers for g in o.get_main_grads_for_grad_norm()]
    if grads:
        squares = sum_of_squares(grads)
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
    does nothing, not even count the step, where ``found_inf`` is 1
    (:func:`dfmkit.compat.torch_optim.fused_step_scaling`), so the host never waits for the GPU here. Other
    optimizers (Apex's or TransformerEngine's Adam) read the norm and the flag on the host first, as megatron
    does, and scale the gradients before their step.
    """
    adams = [inner for _, inner in torch_adams(optimizer)]
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    fused = all(group.get("fused") for inner in adams for group in inner.param_groups)
    if adams and len(adams) == len(optimizers) and fused:
        grad_scale = torch.as_tensor(grad_divisor, dtype=torch.float32, device=grad_norm.device)
        if clip_grad > 0:
            grad_scale = grad_scale * ((grad_norm + 1e-6) / clip_grad).clamp(min=1.0)
        with fused_step_scaling(adams, grad_scale, skip.float()):
            optimizer.step_with_ready_grads()
        return
    if bool(skip):
        return
    factor = min(1.0, clip_grad / (float(grad_norm) + 1e-6)) if clip_grad > 0 else 1.0
    factor /= float(grad_divisor)
    if factor != 1.0:
        torch._foreach_mul_([p.grad for o in optimizers for p in o.get_parameters() if p.grad is not None], factor)
    optimizer.step_with_ready_grads()


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
        # On resume the schedule of the recipe applies at the checkpoint's step (megatron would keep the
        # checkpoint's lr, warm-up, decay and length; see dfmkit.train.resume).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler
