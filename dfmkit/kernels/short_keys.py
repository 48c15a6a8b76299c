"""Packed attention over segments of at most 128 keys (cross-attention to a caption) as one Triton kernel
each way (CUDA, half precision).

    attention(q [Tq, H, D], k [Tk, H, D], v [Tk, H, D], params) -> out [Tq, H, D]

A segment's keys fit in one tile, so a program holds all of them and the softmax is taken in one pass
(no running maximum to rescale by, as flash attention needs over long key sequences). The forward
writes the output and each row's log-sum-exp. One backward program per segment and head walks the
segment's query tiles: it recomputes the probabilities from the log-sum-exp, writes each tile's query
gradient in the inputs' dtype and sums the key and value gradients in registers, written once (no
atomics: deterministic).

Why: on short keys a library kernel's fixed costs dominate. cuDNN's backward runs two extra passes over the
queries' size, one for ``rowsum(dO * O)`` and one turning an fp32 query gradient into bf16; here both happen in
registers. They beat cuDNN up to 64 keys a segment and lose to it on equal segments of 77 (docs/performance.md),
so the torch backend leaves equal-length segments of more than ``BEATS_CUDNN_UP_TO`` keys to cuDNN.

Launch shapes are per key tile (``LAUNCH``), swept on an H200 by benchmarks/attention_kernels.py.
:func:`takes` says where the kernels apply; the torch backend calls them there
(:mod:`dfmkit.components.attention.torch_backend`).
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
# The torch backend prefers cuDNN for equal-length segments of more keys than this (see torch_backend).
BEATS_CUDNN_UP_TO = 64

# key tile -> (forward query tile, forward warps, backward query tile, backward warps); swept on an H200.
LAUNCH = {16: (64, 4, 64, 4), 32: (128, 4, 128, 4), 64: (64, 4, 64, 4), 128: (64, 4, 128, 8)}


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: VarlenParams) -> bool:
    """Whether the kernels run this call: CUDA half precision, head dim <= 128, at most ``MAX_KEYS`` keys a
    segment, channels contiguous, fewer than 65536 segments (a launch grid's second dimension)."""
    return (triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == q.dtype and v.dtype == q.dtype and q.shape[-1] <= MAX_HEAD_DIM
            and params.max_seqlen_k <= MAX_KEYS and params.cu_seqlens_q.shape[0] <= 65536
            and all(t.stride(-1) == 1 for t in (q, k, v)))


if triton is not None:

    @triton.jit
    def _offsets(rows, row_mask, stride_t, stride_h, head, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
        """Offsets and masks of a tile's two parts of the head's channels: ``[0, D0)`` and ``[D0, D0 + D1)``
        (masked past ``D``). A head of 72 channels is 64 + 16 rather than padded to 128: the key and value
        gradients summed in registers take 80 columns, not 128."""
        row = rows[:, None].to(tl.int64) * stride_t + head * stride_h
        cols0, cols1 = tl.arange(0, D0), D0 + tl.arange(0, D1)
        return (row + cols0[None, :], row + cols1[None, :], row_mask[:, None] & (cols0 < D)[None, :],
                row_mask[:, None] & (cols1 < D)[None, :])

    @triton.jit
    def _load(base, rows, row_mask, stride_t, stride_h, head, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
        off0, off1, mask0, mask1 = _offsets(rows, row_mask, stride_t, stride_h, head, D, D0, D1)
        return tl.load(base + off0, mask=mask0, other=0.0), tl.load(base + off1, mask=mask1, other=0.0)

    @triton.jit
    def _store(base, rows, row_mask, stride_t, stride_h, head, part0, part1, D: tl.constexpr, D0: tl.constexpr,
               D1: tl.constexpr):
        off0, off1, mask0, mask1 = _offsets(rows, row_mask, stride_t, stride_h, head, D, D0, D1)
        tl.store(base + off0, part0.to(base.dtype.element_ty), mask=mask0)
        tl.store(base + off1, part1.to(base.dtype.element_ty), mask=mask1)

    @triton.jit
    def _segment_keys(CU_Q, CU_K, K, V, stride_kt, stride_vt, stride_kh: tl.constexpr, stride_vh: tl.constexpr, head,
                      D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_K: tl.constexpr):
        """A backward program's segment (``program_id(0)``): its query range, and its keys and values for the head."""
        segment = tl.program_id(0)
        q_start, q_end = tl.load(CU_Q + segment), tl.load(CU_Q + segment + 1)
        k_start, k_end = tl.load(CU_K + segment), tl.load(CU_K + segment + 1)
        keys = k_start + tl.arange(0, BLOCK_K)
        key_mask = keys < k_end
        k0, k1 = _load(K, keys, key_mask, stride_kt, stride_kh, head, D, D0, D1)
        v0, v1 = _load(V, keys, key_mask, stride_vt, stride_vh, head, D, D0, D1)
        return q_start, q_end, keys, key_mask, k0, k1, v0, v1

    @triton.jit
    def _query_tile(Q, DO, O, rows, row_mask, stride_qt, stride_dot, stride_ot, stride_qh: tl.constexpr,
                    stride_doh: tl.constexpr, stride_oh: tl.constexpr, head, D: tl.constexpr, D0: tl.constexpr,
                    D1: tl.constexpr):
        """A query tile's two parts of q and dO, and each row's ``rowsum(dO * O)`` in fp32."""
        q0, q1 = _load(Q, rows, row_mask, stride_qt, stride_qh, head, D, D0, D1)
        do0, do1 = _load(DO, rows, row_mask, stride_dot, stride_doh, head, D, D0, D1)
        o0, o1 = _load(O, rows, row_mask, stride_ot, stride_oh, head, D, D0, D1)
        delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1) + tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
        return q0, q1, do0, do1, delta

    @triton.jit
    def _scores(q0, q1, k0, k1, key_mask, scale_log2):
        """``q k^T * scale`` in base 2; keys past the segment get -inf."""
        s = tl.dot(q1, tl.trans(k1), tl.dot(q0, tl.trans(k0))) * scale_log2
        return tl.where(key_mask[None, :], s, float("-inf"))

    @triton.jit(do_not_specialize=["n_queries"])
    def _short_key_attn_forward(Q, K, V, O, LSE, CU_Q, CU_K, scale_log2, n_queries, stride_qt, stride_kt, stride_vt,
                                stride_ot, stride_qh: tl.constexpr, stride_kh: tl.constexpr,
                                stride_vh: tl.constexpr, stride_oh: tl.constexpr, D: tl.constexpr,
                                D0: tl.constexpr, D1: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
        block, segment, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q_start, q_end = tl.load(CU_Q + segment), tl.load(CU_Q + segment + 1)
        first = q_start + block * BLOCK_Q
        if first >= q_end:  # the segment is shorter than the longest one
            return
        k_start, k_end = tl.load(CU_K + segment), tl.load(CU_K + segment + 1)
        rows, keys = first + tl.arange(0, BLOCK_Q), k_start + tl.arange(0, BLOCK_K)
        row_mask, key_mask = rows < q_end, keys < k_end
        q0, q1 = _load(Q, rows, row_mask, stride_qt, stride_qh, head, D, D0, D1)
        k0, k1 = _load(K, keys, key_mask, stride_kt, stride_kh, head, D, D0, D1)
        v0, v1 = _load(V, keys, key_mask, stride_vt, stride_vh, head, D, D0, D1)
        s = _scores(q0, q1, k0, k1, key_mask, scale_log2)
        row_max = tl.max(s, 1)
        p = tl.exp2(s - row_max[:, None])
        row_sum = tl.sum(p, 1)
        p = p.to(v0.dtype)
        out0 = tl.dot(p, v0) / row_sum[:, None]
        out1 = tl.dot(p, v1) / row_sum[:, None]
        _store(O, rows, row_mask, stride_ot, stride_oh, head, out0, out1, D, D0, D1)
        tl.store(LSE + head.to(tl.int64) * n_queries + rows, row_max + tl.log2(row_sum), mask=row_mask)

    @triton.jit(do_not_specialize=["n_queries"])
    def _short_key_attn_backward(Q, K, V, O, DO, LSE, DQ, DK, DV, CU_Q, CU_K, scale_log2, scale, n_queries,
                                 stride_qt, stride_kt, stride_vt, stride_ot, stride_dot, stride_qh: tl.constexpr,
                                 stride_kh: tl.constexpr, stride_vh: tl.constexpr, stride_oh: tl.constexpr,
                                 stride_doh: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                                 D0: tl.constexpr, D1: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
        """One program per segment and head. ``DQ`` is laid out as ``Q`` is contiguous, ``DK``/``DV`` as ``K``."""
        head = tl.program_id(1)
        q_start, q_end, keys, key_mask, k0, k1, v0, v1 = _segment_keys(CU_Q, CU_K, K, V, stride_kt, stride_vt,
                                                                       stride_kh, stride_vh, head, D, D0, D1, BLOCK_K)
        grad_k0 = tl.zeros([BLOCK_K, D0], tl.float32)
        grad_k1 = tl.zeros([BLOCK_K, D1], tl.float32)
        grad_v0 = tl.zeros([BLOCK_K, D0], tl.float32)
        grad_v1 = tl.zeros([BLOCK_K, D1], tl.float32)
        for first in range(q_start, q_end, BLOCK_Q):
            rows = first + tl.arange(0, BLOCK_Q)
            row_mask = rows < q_end  # rows past the segment load as zeros: nothing of theirs reaches k and v
            q0, q1, do0, do1, delta = _query_tile(Q, DO, O, rows, row_mask, stride_qt, stride_dot, stride_ot,
                                                  stride_qh, stride_doh, stride_oh, head, D, D0, D1)
            lse = tl.load(LSE + head.to(tl.int64) * n_queries + rows, mask=row_mask, other=0.0)
            p = tl.exp2(_scores(q0, q1, k0, k1, key_mask, scale_log2) - lse[:, None])
            p_t = tl.trans(p.to(do0.dtype))
            grad_v0 = tl.dot(p_t, do0, grad_v0)
            grad_v1 = tl.dot(p_t, do1, grad_v1)
            grad_p = tl.dot(do1, tl.trans(v1), tl.dot(do0, tl.trans(v0)))
            grad_s = (p * (grad_p - delta[:, None])).to(q0.dtype)
            _store(DQ, rows, row_mask, H * D, D, head, tl.dot(grad_s, k0) * scale, tl.dot(grad_s, k1) * scale,
                   D, D0, D1)
            grad_s_t = tl.trans(grad_s)
            grad_k0 = tl.dot(grad_s_t, q0, grad_k0)
            grad_k1 = tl.dot(grad_s_t, q1, grad_k1)
        _store(DK, keys, key_mask, H * D, D, head, grad_k0 * scale, grad_k1 * scale, D, D0, D1)
        _store(DV, keys, key_mask, H * D, D, head, grad_v0, grad_v1, D, D0, D1)


LOG2_E = 1.4426950408889634


def _blocks(head_dim: int, max_k: int) -> tuple[int, int, int, tuple[int, int, int, int]]:
    """``(D0, D1, key tile, launch shapes)``: the head's two channel parts (see ``_offsets``) and the key tile."""
    d0 = max(16, 1 << (head_dim.bit_length() - 1))  # the largest power of two in head_dim
    d1 = max(16, triton.next_power_of_2(max(head_dim - d0, 1)))
    block_k = max(16, triton.next_power_of_2(max(max_k, 1)))
    return d0, d1, block_k, LAUNCH[block_k]


def _strides(*tensors: torch.Tensor) -> dict:
    """The tensors' token strides (arguments: Triton specialises on multiples of 16 anyway) and head strides
    (constants: an argument of 72 is no multiple of 16, so Triton could not know a head's channels start
    16-byte aligned and vectorise the loads: with this and the 64 + 16 split the kernels took about 2/3 of the
    time)."""
    names = ["q", "k", "v", "o", "do"][: len(tensors)]
    return {**{f"stride_{n}t": t.stride(0) for n, t in zip(names, tensors)},
            **{f"stride_{n}h": t.stride(1) for n, t in zip(names, tensors)}}


# The launches are custom operators: torch.compile keeps them whole in its graphs, with what they read and
# write declared (see kernels/adaln.py for why).
@torch.library.custom_op("dfmkit::short_key_attention_forward", mutates_args=())
def _launch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                    max_q: int, max_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [Tq, H, D] contiguous, lse [H, Tq] fp32, base 2)``."""
    tokens, heads, head_dim = q.shape
    out = q.new_empty((tokens, heads, head_dim))
    lse = torch.empty((heads, tokens), dtype=torch.float32, device=q.device)
    d0, d1, block_k, (block_q, warps, *_) = _blocks(head_dim, max_k)
    segments = cu_q.shape[0] - 1
    if tokens and segments:
        _short_key_attn_forward[(triton.cdiv(max_q, block_q), segments, heads)](
            q, k, v, out, lse, cu_q, cu_k, head_dim ** -0.5 * LOG2_E, tokens, **_strides(q, k, v, out),
            D=head_dim, D0=d0, D1=d1, BLOCK_Q=block_q, BLOCK_K=block_k, num_warps=warps,
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
    d0, d1, block_k, (_, _, block_q, warps) = _blocks(head_dim, max_k)
    segments = cu_q.shape[0] - 1
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if not segments:
        return grad_q, grad_k, grad_v
    _short_key_attn_backward[(segments, heads)](
        q, k, v, out, grad_out, lse, grad_q, grad_k, grad_v, cu_q, cu_k, head_dim ** -0.5 * LOG2_E,
        head_dim ** -0.5, tokens, H=heads, D=head_dim, D0=d0, D1=d1, BLOCK_Q=block_q, BLOCK_K=block_k,
        num_warps=warps, **_strides(q, k, v, out, grad_out),
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
    if not torch.is_grad_enabled():  # without autograd the op itself (see dfmkit.kernels.adaln.norm_modulate)
        return _launch_forward(q, k, v, params.cu_seqlens_q, params.cu_seqlens_k, params.max_seqlen_q,
                               params.max_seqlen_k)[0]
    return _ShortKeyAttention.apply(q, k, v, params.cu_seqlens_q, params.cu_seqlens_k, params.max_seqlen_q,
                                    params.max_seqlen_k)
