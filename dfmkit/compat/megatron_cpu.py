"""megatron-core on a machine without a GPU: the CUDA assumptions dfmkit's CPU (gloo) runs reach, neutralised.

Checked on megatron-core 0.16.1, torch 2.13.0 (CPU build); on a GPU machine nothing here is applied.

megatron-core assumes CUDA in a few places that dfmkit reaches on CPU runs: the CUDA RNG tracker,
``torch.cuda.current_device()`` as the device of communication buffers, and ``device="cuda"`` literals in the
optimizer and gradient-clipping code. :func:`apply` (called by :func:`dfmkit.parallel.initialize`) neutralises
them, and only when ``torch.cuda.is_available()`` is False; on a GPU machine it does nothing. Patches of
megatron that apply on every device live in the other ``dfmkit.compat`` modules (the optimizer's multi-tensor
fallbacks: :mod:`dfmkit.compat.megatron_optimizer`). (../shared/CPU_STACK_FINDINGS.md section 2 lists each
failure and why.)

What is patched, and why:

1. RNG tracker: megatron's ``CudaRNGStatesTracker`` stores CUDA generator states. It is replaced by
   :class:`CPURNGStatesTracker`, which stores CPU generator states and swaps the CPU RNG state in
   ``fork()``; ``_get_cuda_rng_state``/``_set_cuda_rng_state`` (used by megatron's activation
   checkpointing) read and write the CPU RNG state. ``model_parallel_cuda_manual_seed`` then works
   unchanged, and so do dropout in tensor-parallel regions and ``recompute = "full"``.
2. ``torch.cuda.current_device`` returns ``torch.device("cpu")``: about 175 call sites in megatron use
   it as the device of all-gather / reduce-scatter buffers. Nothing else can call it on a CPU-only
   build without failing, so the global replacement changes no working code path.
3. Optimizer, clipping and L2-norm helpers (``megatron.core.optimizer.optimizer``, ``.clip_grads``,
   ``megatron.core.utils``) build small tensors with ``device="cuda"``: inside those modules the name
   ``torch`` is a proxy whose tensor factories put such tensors on the CPU.
4. ``clip_grad_by_total_norm_fp32`` asserts that gradients are CUDA tensors; it is replaced (in
   ``clip_grads`` and in ``optimizer``, which imported the name) by the same scaling without the
   assertion. megatron still computes the total norm over the tensor-parallel group as usual.
5. ``torch.cuda.synchronize`` (called by dist_checkpointing before writing) does nothing.
One limit remains on CPU: the distributed optimizer refuses CPU tensors (use the plain one).

Not needed by dfmkit's DiT, so not patched: megatron's own ``DotProductAttention`` (CPU causal-mask
device; context parallelism needs TransformerEngine), ``WrappedTorchNorm`` under sequence parallelism
and CP RoPE helpers. dfmkit's backbone uses its own attention modules and parameter-free norms.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any

import torch

from dfmkit.compat import missing_attributes, missing_parameters, replace

CHECKED_ON = {"megatron-core": "0.16.1", "torch": "2.13.0"}

_applied = False


def needed() -> bool:
    """True on a machine without a usable GPU: the only case in which :func:`apply` patches anything."""
    return not torch.cuda.is_available()


def apply() -> bool:
    """Patch megatron-core for CPU runs if there is no GPU; idempotent. Returns True if patches are active."""
    global _applied
    if _applied:
        return True
    if not needed():
        return False
    _patch_current_device()
    _patch_rng_tracker()
    _patch_cuda_factories()
    _patch_clip_grads()
    replace(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    _applied = True
    return True


# --------------------------------------------------------------------------------------------
# 1. RNG tracker on the CPU generator
# --------------------------------------------------------------------------------------------


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    class CPURNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron's RNG tracker with CPU generator states (see the module docstring)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state, outer_name = torch.get_rng_state(), self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                restore = self.states_[outer_name] if outer_name != "default-rng" else outer_state
                torch.set_rng_state(restore)
                self._current_state_name = outer_name

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    replace(mp_random, "_get_cuda_rng_state", get_state)
    replace(mp_random, "_set_cuda_rng_state", set_state)
    previous, tracker = mp_random._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker()
    if previous is not None and previous.is_initialized():
        tracker.set_states(previous.get_states())
    replace(mp_random, "_CUDA_RNG_STATE_TRACKER", tracker)
    replace(mp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)


# --------------------------------------------------------------------------------------------
# 2. torch.cuda.current_device
# --------------------------------------------------------------------------------------------


def _patch_current_device() -> None:
    replace(torch.cuda, "current_device", lambda: torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# 3. device="cuda" literals in the optimizer, clipping and norm helpers
# --------------------------------------------------------------------------------------------

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like")


def _on_cpu(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"):
        return torch.device("cpu")
    return device


class _CPUTorchProxy:
    """``torch`` as seen by a patched module: tensor factories asked for CUDA build on the CPU."""

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        if name in _FACTORIES:

            @functools.wraps(value)
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _on_cpu(kwargs["device"])
                return value(*args, **kwargs)

            return factory
        return value


_CUDA_LITERAL_MODULES = ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads",
                         "megatron.core.utils")


def _patch_cuda_factories() -> None:
    proxy = _CPUTorchProxy()
    for module_name in _CUDA_LITERAL_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a megatron-core without that module: nothing to patch there
            continue
        if getattr(module, "torch", None) is torch:
            replace(module, "torch", proxy)


# --------------------------------------------------------------------------------------------
# 4. gradient clipping without the CUDA assertion
# --------------------------------------------------------------------------------------------


def _patch_clip_grads() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        """megatron's clipping: scale every gradient by max_norm / total_norm when that is below 1."""
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        coefficient = max_norm / (total_norm + 1.0e-6)
        if coefficient < 1.0:
            grads = [p.decoupled_grad if use_decoupled_grad else p.grad for p in parameters]
            torch._foreach_mul_([g for g in grads if g is not None], coefficient)

    replace(clip_grads, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)
    replace(optimizer, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)


def check() -> list[str]:
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random as mp_random

    rng = "CPU RNG tracker"
    problems = missing_attributes(rng, mp_random, "CudaRNGStatesTracker", "_MODEL_PARALLEL_RNG_TRACKER_NAME",
                                  "_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED")
    problems += missing_parameters(rng, mp_random, "_get_cuda_rng_state", "device", "clone", "graph_safe")
    problems += missing_parameters(rng, mp_random, "_set_cuda_rng_state", "new_state", "device", "graph_safe")
    if hasattr(mp_random, "CudaRNGStatesTracker"):  # the state CPURNGStatesTracker keeps in megatron's attributes
        tracker = mp_random.CudaRNGStatesTracker()
        problems += missing_attributes(rng, mp_random.CudaRNGStatesTracker, "add", "fork", "get_states",
                                       "set_states", "is_initialized")
        problems += [f"{rng}: a CudaRNGStatesTracker has no '{name}'"
                     for name in ("states_", "seeds_", "_current_state_name", "_is_initialized")
                     if not hasattr(tracker, name)]
    problems += missing_attributes("current_device on the CPU", torch.cuda, "current_device")
    problems += missing_attributes("synchronize on the CPU", torch.cuda, "synchronize")
    for module_name in _CUDA_LITERAL_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            problems.append(f"device=\"cuda\" literals on the CPU: there is no module {module_name}")
            continue
        problems += missing_attributes("device=\"cuda\" literals on the CPU", module, "torch")
    for module in (clip_grads, optimizer):
        problems += missing_parameters("clip_grad_by_total_norm_fp32 without the CUDA assertion", module,
                                       "clip_grad_by_total_norm_fp32", "parameters", "max_norm", "total_norm",
                                       "use_decoupled_grad")
    return problems
