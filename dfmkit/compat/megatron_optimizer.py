"""megatron-core's optimizer: torch's multi-tensor kernels for its fallbacks, and torch's Adam(W) made loadable.

Checked on megatron-core 0.16.1, torch 2.13.0 (the GPU path, with megatron's distributed optimizer, also on
torch 2.11 CUDA).

What is changed, and why:

1. :func:`use_foreach_multi_tensor_ops`: without Apex or TransformerEngine, megatron's gradient norm
   (``clip_grads.l2_norm_impl``) takes one ``torch.norm`` per parameter and then builds a tensor from the list,
   which reads each norm back to the host: about 380 host syncs a step for DiT-XL; its scaling fallback
   (``multi_tensor_scale_impl`` of ``clip_grads`` and ``optimizer``), which its fp16/bf16 optimizer copies
   through, launches two kernels per tensor. Both module attributes get torch's multi-tensor kernels instead.
2. :func:`copy_main_params_with_foreach`: megatron's distributed optimizer copies its fp32 master weights into
   the model's weights with a ``copy_`` per parameter (374 kernel launches a step for DiT-XL); its
   ``_copy_main_params_to_model_params`` is replaced, per optimizer, by one multi-tensor copy (it reads the
   private ``_get_model_param_range_map`` and the optimizer's buffer maps).
3. Loading a checkpoint into torch's Adam(W) (megatron's fallback without Apex or TransformerEngine), which
   megatron-core's distributed optimizer cannot do as it stands: :func:`fill_empty_adam_state` gives a fresh
   Adam the state it would have after a step (megatron reads the step count of the state it is about to
   replace), and :func:`load_parameter_state_without_step` replaces its ``_set_main_param_and_optimizer_states``,
   which copies the saved tensors into ALL state keys, "step" included, although the saved parameter state has
   no "step" (every GPU resume failed with KeyError 'step').
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch

from dfmkit.compat import missing_attributes, missing_parameters, replace

CHECKED_ON = {"megatron-core": "0.16.1", "torch": "2.13.0"}


def torch_adams(optimizer) -> Iterator[tuple[object, torch.optim.Optimizer]]:
    """(megatron optimizer, its torch Adam or AdamW) for each optimizer megatron chains together."""
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(megatron_optimizer, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield megatron_optimizer, inner


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The fp32 sum of the squares of all elements of ``tensors`` (any precisions), on torch's multi-tensor kernels."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square().sum()


# --------------------------------------------------------------------------------------------
# 1. torch's multi-tensor kernels for megatron's fallbacks
# --------------------------------------------------------------------------------------------


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's ``multi_tensor_l2norm`` on torch's multi-tensor kernels: ``([total norm], None)``."""
    return sum_of_squares(tensor_lists[0]).sqrt().reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """megatron's ``multi_tensor_scale``: ``destination = source * scale`` for each pair of tensors."""
    sources, destinations = tensor_lists
    if all(s is d for s, d in zip(sources, destinations)):
        torch._foreach_mul_(destinations, scale)
    else:
        torch._foreach_copy_(destinations, sources if scale == 1.0 else torch._foreach_mul(sources, scale))


def use_foreach_multi_tensor_ops() -> bool:
    """Give megatron-core torch's multi-tensor kernels where it would use its own fallbacks (see the module
    docstring). Returns True if anything was replaced (the fallbacks were in use); with Apex or
    TransformerEngine installed nothing changes."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer

    replaced = False
    if getattr(clip_grads, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
        replace(clip_grads, "l2_norm_impl", _foreach_l2_norm)
        replaced = True
    for module in (clip_grads, megatron_optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            replace(module, "multi_tensor_scale_impl", _foreach_scale)
            replaced = True
    return replaced


# --------------------------------------------------------------------------------------------
# 2. the distributed optimizer's copy of its master weights, one multi-tensor copy
# --------------------------------------------------------------------------------------------


def copy_main_params_with_foreach(optimizer) -> int:
    """Make megatron's distributed optimizer copy its fp32 master weights into the model's weights with one
    multi-tensor copy per group instead of a ``copy_`` per parameter. For its plain layout (not FSDP, FP8 or
    precision-aware); returns how many optimizers changed."""
    from megatron.core.fp8_utils import is_float8tensor

    changed = 0
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(megatron_optimizer, "shard_fp32_from_float16_groups"):
            continue
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


# --------------------------------------------------------------------------------------------
# 3. checkpoints into torch's Adam(W)
# --------------------------------------------------------------------------------------------


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
    """Make megatron's distributed optimizer copy only the saved keys into a torch Adam(W)'s state (see the
    module docstring). For the plain (not precision-aware) layout."""
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


# --------------------------------------------------------------------------------------------
# What the patches rely on
# --------------------------------------------------------------------------------------------

# The distributed optimizer's attributes the replaced methods read (set in its __init__, so looked up in its source).
_DISTRIBUTED_OPTIMIZER_NAMES = ("shard_fp32_from_float16_groups", "model_float16_groups", "model_fp32_groups",
                                "shard_fp32_groups", "model_param_gbuf_map", "model_param_group_index_map",
                                "gbuf_world_in_bucket", "is_stub_optimizer", "buffers", "param_data")


def check() -> list[str]:
    import dataclasses

    from megatron.core import fp8_utils, utils
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as megatron_optimizer

    patch = "use_foreach_multi_tensor_ops"
    problems = missing_attributes(patch, clip_grads, "l2_norm_impl", "multi_tensor_scale_impl")
    problems += missing_attributes(patch, megatron_optimizer, "multi_tensor_scale_impl")
    problems += missing_parameters(patch, utils, "local_multi_tensor_l2_norm",
                                   "chunk_size", "noop_flag", "tensor_lists", "per_tensor")
    problems += missing_parameters(patch, utils, "local_multi_tensor_scale",
                                   "chunk_size", "noop_flag", "tensor_lists", "scale")

    patch = "copy_main_params_with_foreach"
    optimizer = distrib_optimizer.DistributedOptimizer
    problems += missing_attributes(patch, optimizer, "_copy_main_params_to_model_params")
    problems += missing_parameters(patch, optimizer, "_get_model_param_range_map", "param")
    problems += missing_attributes(patch, fp8_utils, "is_float8tensor")
    if "use_megatron_fsdp" not in {f.name for f in dataclasses.fields(DistributedDataParallelConfig)}:
        problems.append(f"{patch}: DistributedDataParallelConfig has no field 'use_megatron_fsdp'")
    source = inspect.getsource(distrib_optimizer)
    problems += [f"{patch}: megatron.core.optimizer.distrib_optimizer never mentions '{name}'"
                 for name in _DISTRIBUTED_OPTIMIZER_NAMES if name not in source]
    if not hasattr(OptimizerConfig(), "use_precision_aware_optimizer_no_fp8_or_ds_fp8"):
        problems.append(f"{patch}: an OptimizerConfig has no 'use_precision_aware_optimizer_no_fp8_or_ds_fp8'")

    patch = "load_parameter_state_without_step"
    problems += missing_parameters(patch, optimizer, "_set_main_param_and_optimizer_states", "model_param", "tensors")

    patch = "fill_empty_adam_state"
    param = torch.nn.Parameter(torch.zeros(1))
    adam = torch.optim.AdamW([param])
    param.grad = torch.zeros(1)
    adam.step()
    problems += [f"{patch}: torch's AdamW keeps no '{key}' in its state" for key in ("step", "exp_avg", "exp_avg_sq")
                 if key not in adam.state[param]]
    return problems
