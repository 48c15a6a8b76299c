"""Packed attention with PyTorch alone: varlen flash attention on CUDA, SDPA per segment anywhere, flex attention.

Registered names (pick with ``model.attention``):

- ``torch``: the default. On CUDA with bf16/fp16 inputs: where no segment has more than 64 keys (cross-attention
  to a short caption, small images), or segments of unequal lengths have at most 128, dfmkit's Triton kernels
  (:mod:`~dfmkit.kernels.short_keys`, faster than cuDNN there and than flash varlen up to 128 keys;
  cuDNN is faster for equal segments of 65-128 keys); otherwise cuDNN's fused attention as one batched call when
  every segment has the same length (a pack of equal-size images, or captions of one length), else
  flash-attention varlen (``aten._flash_attention_forward``, the kernel behind
  ``torch.nn.attention.varlen.varlen_attn``, called directly: its autograd is C++, the custom op's is
  Python and costs about 0.5 ms of CPU per call). Everywhere else (CPU, fp32) one
  ``scaled_dot_product_attention`` call per segment (one batched call for equal-length segments).
  cuDNN is about 1.5x faster than flash varlen on DiT-XL's shapes on an H100
  (benchmarks/attention_kernels.py); inside the compiled DiT-XL training step it saves 10 ms of GPU time
  at 128 x 256 tokens and 15 ms at 15 x 1024 tokens (torch 2.11, H100).
- ``torch-cudnn``: cuDNN or flash varlen as in ``torch``, without the short-key kernels; CUDA only (a clear error
  instead of the SDPA fallback elsewhere).
- ``torch-varlen``: flash varlen only (CUDA, bf16/fp16; a clear error otherwise).
- ``torch-sdpa``: the per-segment SDPA loop only (correct on every device and dtype; the reference
  the others are tested against).
- ``torch-flex``: ``flex_attention`` with a document mask built once per forward (compiled on CUDA;
  on CPU eager and forward-only: PyTorch has no flex backward there).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dfmkit.kernels import short_keys
from dfmkit.components.attention.base import VarlenParams
from dfmkit.errors import DfmkitError


class AttentionBackendError(DfmkitError):
    """An attention backend asked to run where it cannot."""


# --------------------------------------------------------------------------------------------
# Per-segment SDPA: correct everywhere
# --------------------------------------------------------------------------------------------


def sdpa_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: VarlenParams) -> torch.Tensor:
    """One ``scaled_dot_product_attention`` per segment; ``[T, H, D]`` in and out.

    When all query segments have one length and all key segments another (images of one size packed
    together, captions of one length), the segments are a batch: one SDPA call instead of one per
    segment, which on CPU is most of the attention time of a pack of many small images.
    """
    cu_q, cu_k = params.host_cu_seqlens_q, params.host_cu_seqlens_k
    if (lengths := equal_segments(q, k, params)) is not None:
        return attend_as_batch(F.scaled_dot_product_attention, q, k, v, *lengths)
    outputs = []
    for i in range(params.num_segments):
        qi = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)  # [H, Sq, D]
        ki = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1)
        vi = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1)
        outputs.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))
    return torch.cat(outputs) if outputs else q.new_zeros(q.shape)


class SDPASegments(torch.nn.Module):
    """Packed attention as one SDPA call per segment."""

    def forward(self, q, k, v, params: VarlenParams):
        return sdpa_segments(q, k, v, params)


# --------------------------------------------------------------------------------------------
# Flash attention varlen (CUDA, half precision)
# --------------------------------------------------------------------------------------------


@functools.cache
def _varlen_fn():
    """The flash-attention varlen call: the aten op directly (its backward is registered in C++, so a call
    costs no Python autograd), else ``torch.nn.attention.varlen.varlen_attn`` (a Python custom op)."""
    if hasattr(torch.ops.aten, "_flash_attention_forward"):

        def flash(q, k, v, p):
            return torch.ops.aten._flash_attention_forward(
                q, k, v, p.cu_seqlens_q, p.cu_seqlens_k, p.max_seqlen_q, p.max_seqlen_k, 0.0, False, False
            )[0]

        return flash
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return lambda q, k, v, p: varlen_attn(q, k, v, p.cu_seqlens_q, p.cu_seqlens_k, p.max_seqlen_q, p.max_seqlen_k)


def varlen_available(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen_fn() is not None


class FlashVarlen(torch.nn.Module):
    """Packed attention through PyTorch's flash-attention varlen kernel."""

    def forward(self, q, k, v, params: VarlenParams):
        if not varlen_available(q):
            raise AttentionBackendError(
                f"attention backend 'torch-varlen' needs CUDA tensors in bf16/fp16 and torch >= 2.10 "
                f"(got {q.device.type} {q.dtype}, torch {torch.__version__}); use 'torch' to fall back automatically"
            )
        return _varlen_fn()(q, k, v, params)


# --------------------------------------------------------------------------------------------
# cuDNN attention for packs of equal-length segments (CUDA, half precision)
# --------------------------------------------------------------------------------------------


def equal_segments(q: torch.Tensor, k: torch.Tensor, params: VarlenParams) -> tuple[int, int] | None:
    """(query length, key length) when every segment has the same of each and they fill the tensors."""
    if not params.equal:
        return None
    n = params.cu_seqlens_q.shape[0] - 1  # from shapes, not host ints: symbolic under torch.compile
    len_q, len_k = q.shape[0] // n, k.shape[0] // n
    return (len_q, len_k) if len_q * n == q.shape[0] and len_k * n == k.shape[0] else None


def attend_as_batch(attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, len_q: int, len_k: int) -> torch.Tensor:
    """Equal-length segments of packed ``[T, H, D]`` tensors as one batch: ``attention`` gets ``[N, H, S, D]``
    views (no copies) and its output comes back packed."""
    n = q.shape[0] // len_q
    as_batch = lambda t, length: t.view(n, length, *t.shape[1:]).transpose(1, 2)  # noqa: E731
    out = attention(as_batch(q, len_q), as_batch(k, len_k), as_batch(v, len_k))
    return out.transpose(1, 2).reshape(q.shape)


# Evaluated once while torch.compile traces and kept as a constant: the cuDNN and device queries inside
# are not traceable, and each call broke the compiled DiT layer into pieces (9 graphs per layer).
@torch.compiler.assume_constant_result
def _cudnn_attention_supported(device_index: int) -> bool:
    return _cudnn_attention_supported_on(device_index)


@functools.cache
def _cudnn_attention_supported_on(device_index: int) -> bool:
    return (hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention") and torch.backends.cudnn.is_available()
            and (torch.backends.cudnn.version() or 0) >= 90000 and torch.cuda.get_device_capability(device_index) >= (8, 0))


def cudnn_available(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
            and _cudnn_attention_supported(q.device.index or 0))


def _cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """cuDNN's fused attention on ``[N, H, S, D]`` (the aten op, whose backward is registered in C++)."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[0]


def cudnn_or_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: VarlenParams) -> torch.Tensor:
    """cuDNN on equal-length segments run as one batch where cuDNN can, flash varlen otherwise (CUDA, bf16/fp16)."""
    if cudnn_available(q) and (lengths := equal_segments(q, k, params)) is not None:
        return attend_as_batch(_cudnn_attention, q, k, v, *lengths)
    return _varlen_fn()(q, k, v, params)


class CudnnEqualSegments(torch.nn.Module):
    """cuDNN attention where the segments have equal lengths (CUDA, bf16/fp16), flash varlen otherwise."""

    def forward(self, q, k, v, params: VarlenParams):
        if not varlen_available(q):
            raise AttentionBackendError(
                f"attention backend 'torch-cudnn' needs CUDA tensors in bf16/fp16 (got {q.device.type} {q.dtype})")
        return cudnn_or_varlen(q, k, v, params)


class AutoTorchAttention(torch.nn.Module):
    """dfmkit's short-key kernels where no segment has more than 64 keys (or unequal ones more than 128), else
    cuDNN for equal-length segments and flash varlen otherwise where they run (CUDA, bf16/fp16), per-segment SDPA
    elsewhere."""

    def forward(self, q, k, v, params: VarlenParams):
        if short_keys.takes(q, k, v, params) and (params.max_seqlen_k <= short_keys.BEATS_CUDNN_UP_TO
                                                  or not (cudnn_available(q) and equal_segments(q, k, params))):
            return short_keys.attention(q, k, v, params)
        if varlen_available(q):
            return cudnn_or_varlen(q, k, v, params)
        return sdpa_segments(q, k, v, params)


# --------------------------------------------------------------------------------------------
# Flex attention with a document mask
# --------------------------------------------------------------------------------------------


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


class FlexDocumentAttention(torch.nn.Module):
    """Packed attention as ``flex_attention`` with a block mask keeping each query in its segment."""

    def forward(self, q, k, v, params: VarlenParams):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        key = ("flex_block_mask", q.shape[0], k.shape[0])
        block_mask = params.cache.get(key)
        if block_mask is None:
            segments = torch.arange(params.num_segments, device=q.device)
            doc_q = torch.repeat_interleave(segments, torch.diff(params.cu_seqlens_q).to(torch.int64))
            doc_k = torch.repeat_interleave(segments, torch.diff(params.cu_seqlens_k).to(torch.int64))

            def same_segment(b, h, q_idx, kv_idx):
                return doc_q[q_idx] == doc_k[kv_idx]

            block_mask = create_block_mask(same_segment, None, None, q.shape[0], k.shape[0], device=q.device)
            params.cache[key] = block_mask
        attend = _compiled_flex() if q.is_cuda else flex_attention
        out = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask)
        return out[0].transpose(0, 1)


def build_auto(options, **_context) -> torch.nn.Module:
    return AutoTorchAttention()


def build_varlen(options, **_context) -> torch.nn.Module:
    return FlashVarlen()


def build_sdpa(options, **_context) -> torch.nn.Module:
    return SDPASegments()


def build_cudnn(options, **_context) -> torch.nn.Module:
    return CudnnEqualSegments()


def build_flex(options, **_context) -> torch.nn.Module:
    return FlexDocumentAttention()
