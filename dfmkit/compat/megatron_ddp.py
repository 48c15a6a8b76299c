"""megatron-core's DDP with the adds of gradients into the fp32 ``main_grad`` buffers batched, one fused pass per layer.

Checked on megatron-core 0.16.1, torch 2.13.0 (the compiled CUDA path also on torch 2.11 CUDA).

What it changes of the libraries: :class:`BatchedAccumulationDDP` overrides megatron DDP's private
``_make_backward_post_hook`` (a copy of megatron's hook with its ``main_grad.add_(grad)`` replaced) and wraps
``start_grad_sync`` of each bucket group; it queues its end-of-backward adds with autograd's private
``Variable._execution_engine.queue_callback``, and :func:`add_within_the_step` puts back dynamo's private
``GenerationTracker.generation``.

megatron's ``DistributedDataParallel`` adds each parameter's gradient into its ``main_grad`` in that parameter's
own hook: on a GPU one kernel launch per parameter, not vectorised since the two dtypes differ (for DiT-XL, 374
launches and 3.5 ms of a 274 ms step on an H200, and as many gaps between kernels). Here the hook keeps the
gradient, and the adds run once all parameters of a group are in: a DiT layer's (its compiled backward yields
them together), or the parameters of each other top-level module. On CUDA a group's adds are one compiled
foreach (all layers share its graph, compiled when the DDP is built); on the CPU they are the plain adds.

Whatever is still kept is added before megatron starts any bucket's reduction (eagerly: a group split by a bucket
boundary is added one parameter at a time) and at the end of each backward pass, so the reductions, the gradient
norm and the optimizer see the ``main_grad`` that megatron's own hooks would leave; the bucket bookkeeping
(``register_grad_ready``) is megatron's.
"""

from __future__ import annotations

import functools
import inspect
import re
import types

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.transformer.cuda_graphs import is_graph_capturing

from dfmkit.compat import missing_attributes, missing_parameters

CHECKED_ON = {"megatron-core": "0.16.1", "torch": "2.13.0"}


def _add_into(mains: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    torch._foreach_add_(mains, grads)


def compile_adds():
    """The adds, torch.compile'd, with a code object of their own. Dynamo keeps a code object's compiled graphs
    together, at most ``recompile_limit`` (8) of them: with one code object for all kinds of groups, those after
    the eighth ran uncompiled (and warned)."""
    code = _add_into.__code__.replace()
    return torch.compile(types.FunctionType(code, _add_into.__globals__, _add_into.__name__), dynamic=False)


def add_within_the_step(compiled_adds, mains: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """``compiled_adds(mains, grads)``, called from a backward hook. Every call of a torch.compile'd function
    advances dynamo's generation counter, which inductor's CUDA graph trees read as the start of a new step: the
    outputs of the layers' graphed backward still in use would count as overwritten (``model.cuda_graphs``).
    These adds are part of the step, so the counter is put back."""
    try:
        from torch._dynamo.mutation_guard import GenerationTracker
    except ImportError:  # a torch without this counter: nothing to put back
        compiled_adds(mains, grads)
        return
    generation = GenerationTracker.generation
    try:
        compiled_adds(mains, grads)
    finally:
        GenerationTracker.generation = generation


def _group_name(param_name: str) -> str:
    """``decoder.layers.7.mlp.linear_fc1.weight`` -> ``decoder.layers.7``; ``x_embedder.weight`` -> ``x_embedder``."""
    name = param_name.removeprefix("module.")
    layer = re.match(r"(.*?\blayers\.\d+)\.", name)
    return layer.group(1) if layer else name.split(".")[0]


class BatchedAccumulationDDP(DistributedDataParallel):
    """``DistributedDataParallel`` whose backward hooks batch the gradient adds (see the module docstring)."""

    def __init__(self, config, ddp_config, module, **kwargs):
        super().__init__(config, ddp_config, module, **kwargs)
        self._groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, param in self.module.named_parameters():
            if param in self.param_to_bucket_group:
                self._groups.setdefault(_group_name(name), []).append(param)
        self._group_of = {param: name for name, params in self._groups.items() for param in params}
        self._position = {param: i for params in self._groups.values() for i, param in enumerate(params)}
        self._kept: dict[str, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        self._flush_queued = False
        self._adds: dict[str, object] = {}  # group -> its kind's compiled adds (CUDA)
        for bucket_group in self.bucket_groups + self.expert_parallel_bucket_groups:
            bucket_group.start_grad_sync = self._adding_first(bucket_group.start_grad_sync)
        if next(iter(self.module.parameters())).device.type == "cuda":
            self._compile_adds()

    def _compile_adds(self) -> None:
        """Compile the adds once per kind of group (the parameters' shapes and dtypes in order) here, not in a
        backward hook on autograd's device thread."""
        by_kind: dict[tuple, object] = {}
        for name, params in self._groups.items():
            kind = tuple((p.shape, p.dtype) for p in params)
            if kind not in by_kind:
                by_kind[kind] = compile_adds()
                zeros = [torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in params]
                with torch.no_grad():  # as in the backward hooks: grad mode is in the graph's guards
                    by_kind[kind]([p.main_grad for p in params], zeros)
            self._adds[name] = by_kind[kind]

    def _adding_first(self, start_grad_sync):
        @functools.wraps(start_grad_sync)
        def start(*args, **kwargs):
            self.add_kept_gradients()
            return start_grad_sync(*args, **kwargs)

        return start

    def add_kept_gradients(self) -> None:
        """Add every kept gradient into its ``main_grad`` (groups still incomplete one by one)."""
        self._flush_queued = False
        for name in list(self._kept):
            self._add(name, partial=True)

    def _add(self, name: str, partial: bool = False) -> None:
        pairs = self._kept.pop(name, [])
        if not pairs:
            return
        if name in self._adds and not partial:
            pairs.sort(key=lambda pair: self._position[pair[0]])  # the order its graph was compiled for
            add_within_the_step(self._adds[name], [p.main_grad for p, _ in pairs], [g for _, g in pairs])
        else:  # the compiled graph is for whole groups: anything else would compile again
            for param, grad in pairs:
                param.main_grad.add_(grad)

    def _keep(self, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        if not self._flush_queued:  # the end of this backward pass adds whatever is left
            torch.autograd.Variable._execution_engine.queue_callback(self.add_kept_gradients)
            self._flush_queued = True
        name = self._group_of[param]
        kept = self._kept.setdefault(name, [])
        kept.append((param, grad))
        if len(kept) == len(self._groups[name]):
            self._add(name)

    def _make_backward_post_hook(self, param: torch.nn.Parameter):
        # megatron's hook (distributed_data_parallel.py) with its `main_grad.add_(grad)` replaced by _keep
        def hook(*unused):
            if is_graph_capturing():
                return
            if param in self.param_to_bucket_group:
                assert param.requires_grad
                if self.ddp_config.overlap_grad_reduce:
                    assert param.grad is not None, "param.grad being None is not safe when overlap_grad_reduce is True"
                if param.grad is not None and (
                    not param.grad_added_to_main_grad or getattr(param, "zero_out_wgrad", False)
                ):
                    self._keep(param, param.grad.data)
                param.grad = None
                if self.ddp_config.overlap_grad_reduce:
                    self.param_to_bucket_group[param].register_grad_ready(param, self.force_all_reduce)

        return hook


def check() -> list[str]:
    from megatron.core.distributed import distributed_data_parallel, param_and_grad_buffer

    patch = "BatchedAccumulationDDP"
    problems = missing_parameters(patch, DistributedDataParallel, "_make_backward_post_hook", "param")
    problems += missing_parameters(patch, DistributedDataParallel, "__init__", "config", "ddp_config", "module")
    problems += missing_attributes(patch, DistributedDataParallel, "zero_grad_buffer")
    source = inspect.getsource(distributed_data_parallel)
    problems += [f"{patch}: megatron.core.distributed.distributed_data_parallel never mentions '{name}'"
                 for name in ("param_to_bucket_group", "bucket_groups", "expert_parallel_bucket_groups",
                              "force_all_reduce", "grad_added_to_main_grad", "main_grad")
                 if name not in source]
    problems += missing_attributes(patch, param_and_grad_buffer, "_ParamAndGradBucketGroup")
    if not problems:
        group = param_and_grad_buffer._ParamAndGradBucketGroup
        problems += missing_parameters(patch, group, "start_grad_sync", "force_all_reduce")
        problems += missing_parameters(patch, group, "register_grad_ready", "param", "force_all_reduce")
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    if engine is None or not hasattr(engine, "queue_callback"):
        problems.append(f"{patch}: torch.autograd.Variable._execution_engine has no 'queue_callback'")
    try:
        from torch._dynamo.mutation_guard import GenerationTracker
    except ImportError:
        problems.append("add_within_the_step: torch._dynamo.mutation_guard has no 'GenerationTracker'")
    else:
        problems += missing_attributes("add_within_the_step", GenerationTracker, "generation")
    return problems
