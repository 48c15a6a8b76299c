"""Built-in packed (thd) attention backends, registered through the ``dfmkit_register`` hook.

A backend factory is called as ``build(options, num_heads=..., head_dim=..., kind="self"|"cross")``
(backends take no options) and returns a module ``attend(q, k, v, params)`` (see
:mod:`dfmkit.components.attention.base`).
"""

import importlib.util

from dfmkit.components.attention.base import VarlenParams
from dfmkit.hookspecs import hookimpl

_TORCH = "dfmkit.components.attention.torch_backend"


def transformer_engine_importable() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # installed but unusable here (no CUDA, ABI mismatch): not registered
        return False
    return True


@hookimpl
def dfmkit_register(registries):
    reg = registries.attention
    reg.register("torch", f"{_TORCH}:build_auto",
                 summary="dfmkit's kernels for <= 128 keys, else cuDNN (equal-length samples) or flash varlen on CUDA bf16/fp16, per-sample SDPA elsewhere (default)")
    reg.register("torch-varlen", f"{_TORCH}:build_varlen",
                 summary="flash-attention varlen kernel only (CUDA, bf16/fp16)")
    reg.register("torch-sdpa", f"{_TORCH}:build_sdpa",
                 summary="one scaled_dot_product_attention per packed sample (any device and dtype)")
    reg.register("torch-cudnn", f"{_TORCH}:build_cudnn",
                 summary="cuDNN (equal-length samples) or flash varlen, without the short-key kernels; CUDA bf16/fp16 only")
    reg.register("torch-flex", f"{_TORCH}:build_flex",
                 summary="flex_attention with a per-sample document mask")
    if transformer_engine_importable():
        reg.register("te", "dfmkit.components.attention.te_backend:build",
                     summary="TransformerEngine DotProductAttention, thd format")


__all__ = ["VarlenParams", "dfmkit_register", "transformer_engine_importable"]
