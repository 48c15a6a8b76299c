"""dfmkit's Triton kernels (CUDA, half precision), each replacing a piece of torch code that stays the reference.

- :mod:`.adaln`: the DiT's gated residual + LayerNorm + adaLN modulation, one kernel each way
  (reference: :mod:`dfmkit.components.backbones.dit.layers`);
- :mod:`.qkv`: the attention projections split into heads with per-head RMSNorm and the rotary embedding
  (reference: :mod:`dfmkit.components.backbones.dit.attention`);
- :mod:`.short_keys`: packed attention over segments of at most 128 keys, cross-attention to a caption
  (reference: per-segment SDPA in :mod:`dfmkit.components.attention.torch_backend`).

Each module says where its kernels run (``available()``, ``takes()``: CUDA, bf16/fp16, Triton importable); its
callers run the torch code everywhere else. The modules import without Triton (CPU-only torch) and then define
only those checks.
"""

from dfmkit.kernels import adaln, qkv, short_keys

__all__ = ["adaln", "qkv", "short_keys"]
