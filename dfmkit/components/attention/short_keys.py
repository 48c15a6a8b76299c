"""Packed attention over segments of at most 128 keys (cross-attention to a caption) as one Triton kernel
each way (CUDA, half precision).

    attention(q [Tq, H, D], k [Tk, H, D], v [Tk, H, D], params) -> out [Tq, H, D]

A segment's keys fit in one tile, so a program holds all of them and the softmax is taken in one pass
(no running maximum to rescale by, as flash attention needs over long key sequences). The forward
writes the output and each row's log-sum-exp. One backward program per segment and head walks the
segment's query tiles: it recomputes the probabilities from the log-sum-exp, writes each tile's query
gradient in the inputs' dtype and sums the key and value gradients in registers, written once (no
atomics: deterministic).

Why: cuDNN's fused attention, the fastest library kernel for DiT-XL's cross-attention (128 images x 256
tokens to 77 text tokens each), took 0.46 ms forward + backward a layer on an H200, where its bytes need
about 0.1 ms. Its backward runs two extra passes over the queries' size, one for ``rowsum(dO * O)`` and
one turning an fp32 query gradient into bf16 (8.9 ms of the XL step's 270 ms with self-attention's),
which here are done in registers.

Launch shapes are per key tile (``LAUNCH``), swept on an H200 by benchmarks/attention_kernels.py.
:func:`takes` says where the kernels apply; the torch backend calls them there (see torch_backend).
"""

from __future__ import annotations

import torch

from dfmkit.components.attention.base import VarlenParams

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs of torch come without Triton
    triton = None

MAX_KEYS = 128  # keys per segment in one tile
MAX_HEAD_DIM = 128

# key tile -> (forward query tile, forward warps, backward query tile, backward warps)
LAUNCH = {16: (128, 4, 128, 4), 32: (128, 4, 128, 4), 64: (128, 4, 64, 4), 128: (128, 8, 64, 8)}


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: VarlenParams) -> bool:
    """Whether the kernels run this call: CUDA half precision, head dim <= 128, at most ``MAX_KEYS`` keys a
    segment, channels contiguous."""
    return (triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == q.dtype and v.dtype == q.dtype and q.shape[-1] <= MAX_HEAD_DIM
            and params.max_seqlen_k <= MAX_KEYS and all(t.stride(-1) == 1 for t in (q, k, v)))


if triton is not None:

    @triton.jit
    def _tile_pointers(base, rows, row_mask, stride_t, stride_h, head, cols, col_mask):
        offsets = rows[:, None].to(tl.int64) * stride_t + head * stride_h + cols[None, :]
        return base + offsets, row_mask[:, None] & col_mask[None, :]

    @triton.jit
    def _probabilities(q, k, key_mask, scale_log2, lse):
        """``exp(q k^T * scale - lse)`` per row, in base 2; keys past the segment get 0."""
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where(key_mask[None, :], s, float("-inf"))
        return tl.exp2(s - lse[:, None])

    @triton.jit(do_not_specialize=["n_queries"])
    def _short_key_attn_forward(Q, K, V, O, LSE, CU_Q, CU_K, scale_log2, n_queries, stride_qt, stride_qh, stride_kt, stride_kh,
                 stride_vt, stride_vh, stride_ot, stride_oh, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
        block, segment, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q_start, q_end = tl.load(CU_Q + segment), tl.load(CU_Q + segment + 1)
        first = q_start + block * BLOCK_Q
        if first >= q_end:  # the segment is shorter than the longest one
            return
        k_start, k_end = tl.load(CU_K + segment), tl.load(CU_K + segment + 1)
        rows, keys, cols = first + tl.arange(0, BLOCK_Q), k_start + tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_D)
        row_mask, key_mask, col_mask = rows < q_end, keys < k_end, cols < D
        q_ptr, q_mask = _tile_pointers(Q, rows, row_mask, stride_qt, stride_qh, head, cols, col_mask)
        k_ptr, k_mask = _tile_pointers(K, keys, key_mask, stride_kt, stride_kh, head, cols, col_mask)
        v_ptr, v_mask = _tile_pointers(V, keys, key_mask, stride_vt, stride_vh, head, cols, col_mask)
        q = tl.load(q_ptr, mask=q_mask, other=0.0)
        k = tl.load(k_ptr, mask=k_mask, other=0.0)
        v = tl.load(v_ptr, mask=v_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where(key_mask[None, :], s, float("-inf"))
        row_max = tl.max(s, 1)
        p = tl.exp2(s - row_max[:, None])
        row_sum = tl.sum(p, 1)
        out = tl.dot(p.to(v.dtype), v) / row_sum[:, None]
        o_ptr, o_mask = _tile_pointers(O, rows, row_mask, stride_ot, stride_oh, head, cols, col_mask)
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=o_mask)
        tl.store(LSE + head.to(tl.int64) * n_queries + rows, row_max + tl.log2(row_sum), mask=row_mask)

    @triton.jit(do_not_specialize=["n_queries"])
    def _short_key_attn_backward(Q, K, V, O, DO, LSE, DQ, DK, DV, CU_Q, CU_K, scale_log2, scale, n_queries, stride_qt, stride_qh,
                  stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_dot, stride_doh,
                  D: tl.constexpr, H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
                  BLOCK_K: tl.constexpr):
        """One program per segment and head. ``DQ`` is laid out as ``Q`` is contiguous, ``DK``/``DV`` as ``K``."""
        segment, head = tl.program_id(0), tl.program_id(1)
        q_start, q_end = tl.load(CU_Q + segment), tl.load(CU_Q + segment + 1)
        k_start, k_end = tl.load(CU_K + segment), tl.load(CU_K + segment + 1)
        keys, cols = k_start + tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_D)
        key_mask, col_mask = keys < k_end, cols < D
        k_ptr, k_mask = _tile_pointers(K, keys, key_mask, stride_kt, stride_kh, head, cols, col_mask)
        v_ptr, v_mask = _tile_pointers(V, keys, key_mask, stride_vt, stride_vh, head, cols, col_mask)
        k = tl.load(k_ptr, mask=k_mask, other=0.0)
        v = tl.load(v_ptr, mask=v_mask, other=0.0)
        grad_k = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        grad_v = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        for first in range(q_start, q_end, BLOCK_Q):
            rows = first + tl.arange(0, BLOCK_Q)
            row_mask = rows < q_end
            q_ptr, q_mask = _tile_pointers(Q, rows, row_mask, stride_qt, stride_qh, head, cols, col_mask)
            o_ptr, o_mask = _tile_pointers(O, rows, row_mask, stride_ot, stride_oh, head, cols, col_mask)
            do_ptr, do_mask = _tile_pointers(DO, rows, row_mask, stride_dot, stride_doh, head, cols, col_mask)
            q = tl.load(q_ptr, mask=q_mask, other=0.0)
            grad_out = tl.load(do_ptr, mask=do_mask, other=0.0)
            delta = tl.sum(tl.load(o_ptr, mask=o_mask, other=0.0).to(tl.float32) * grad_out.to(tl.float32), 1)
            # rows past the segment load as zeros and get probabilities 0: nothing of theirs reaches the key gradients
            lse = tl.load(LSE + head.to(tl.int64) * n_queries + rows, mask=row_mask, other=float("inf"))
            p = _probabilities(q, k, key_mask, scale_log2, lse)
            grad_v += tl.dot(tl.trans(p.to(grad_out.dtype)), grad_out)
            grad_s = (p * (tl.dot(grad_out, tl.trans(v)) - delta[:, None])).to(q.dtype)
            grad_q = tl.dot(grad_s, k) * scale
            dq_ptr, dq_mask = _tile_pointers(DQ, rows, row_mask, H * D, D, head, cols, col_mask)
            tl.store(dq_ptr, grad_q.to(DQ.dtype.element_ty), mask=dq_mask)
            grad_k += tl.dot(tl.trans(grad_s), q)
        dk_ptr, _ = _tile_pointers(DK, keys, key_mask, H * D, D, head, cols, col_mask)
        dv_ptr, _ = _tile_pointers(DV, keys, key_mask, H * D, D, head, cols, col_mask)
        tl.store(dk_ptr, (grad_k * scale).to(DK.dtype.element_ty), mask=k_mask)
        tl.store(dv_ptr, grad_v.to(DV.dtype.element_ty), mask=k_mask)


LOG2_E = 1.4426950408889634


def _blocks(head_dim: int, max_k: int) -> tuple[int, int, tuple[int, int, int, int]]:
    block_k = max(16, triton.next_power_of_2(max(max_k, 1)))
    return max(16, triton.next_power_of_2(head_dim)), block_k, LAUNCH[block_k]


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in (t.stride(0), t.stride(1))]


# The launches are custom operators: torch.compile keeps them whole in its graphs, with what they read and
# write declared (see backbones/adaln_kernels for why).
@torch.library.custom_op("dfmkit::short_key_attention_forward", mutates_args=())
def _launch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                    max_q: int, max_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [Tq, H, D] contiguous, lse [H, Tq] fp32, base 2)``."""
    tokens, heads, head_dim = q.shape
    out = q.new_empty((tokens, heads, head_dim))
    lse = torch.empty((heads, tokens), dtype=torch.float32, device=q.device)
    block_d, block_k, (block_q, warps, _, _) = _blocks(head_dim, max_k)
    segments = cu_q.shape[0] - 1
    if tokens and segments:
        _short_key_attn_forward[(triton.cdiv(max_q, block_q), segments, heads)](
            q, k, v, out, lse, cu_q, cu_k, head_dim ** -0.5 * LOG2_E, tokens, *_strides(q, k, v, out),
            D=head_dim, BLOCK_D=block_d, BLOCK_Q=block_q, BLOCK_K=block_k, num_warps=warps,
        )
    return out, lse


@_launch_forward.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("dfmkit::short_key_attention_backward", mutates_args=())
def _launch_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
                     lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, heads, head_dim = q.shape
    grad_q, grad_k, grad_v = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    block_d, block_k, (_, _, block_q, warps) = _blocks(head_dim, max_k)
    segments = cu_q.shape[0] - 1
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if segments:
        _short_key_attn_backward[(segments, heads)](
            q, k, v, out, grad_out, lse, grad_q, grad_k, grad_v, cu_q, cu_k, head_dim ** -0.5 * LOG2_E,
            head_dim ** -0.5, tokens, *_strides(q, k, v, out, grad_out), D=head_dim, H=heads, BLOCK_D=block_d,
            BLOCK_Q=block_q, BLOCK_K=block_k, num_warps=warps,
        )
    return grad_q, grad_k, grad_v


@_launch_backward.register_fake
def _(q, k, v, out, grad_out, lse, cu_q, cu_k, max_k):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class _ShortKeyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k):
        out, lse = _launch_forward(q, k, v, cu_q, cu_k, max_q, max_k)
        ctx.max_k = max_k
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        grad_q, grad_k, grad_v = _launch_backward(q, k, v, out, grad_out, lse, cu_q, cu_k, ctx.max_k)
        return grad_q, grad_k, grad_v, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: VarlenParams) -> torch.Tensor:
    """Packed attention (see :mod:`dfmkit.components.attention.base`) where :func:`takes` holds."""
    return _ShortKeyAttention.apply(q, k, v, params.cu_seqlens_q, params.cu_seqlens_k, params.max_seqlen_q,
                                    params.max_seqlen_k)
