"""Packed attention as Triton flash-attention kernels that keep a head of 72 channels (DiT-XL's) unpadded.

Registered as ``triton`` (pick with ``model.attention``): on CUDA with bf16/fp16 inputs these kernels, per-sample
SDPA everywhere else (as the ``torch`` backend does there).

Why: cuDNN's fused attention runs a head of 72 channels in kernels for 128, flash attention in kernels for 96.
In DiT-XL's training step on an H100 (128 x 256 tokens) attention is 3% of the FLOPs and took 41 ms of 291.
Here a head is split into a power-of-two part and a remainder padded to a power of two of at least 16
(72 = 64 + 16, 8 of them zeros; a power-of-two head is split in halves), so the matrix products run over
80 channels, not 128. Each product over the head becomes two ``tl.dot`` calls, one per part.

The kernels are the flash-attention-2 scheme over packed ("thd") tensors: ``q [Tq, H, D]``, ``k, v [Tk, H, D]``
(any token and head strides, channels contiguous), segment ``i`` of the queries attending to segment ``i`` of
the keys (:mod:`~dfmkit.components.attention.base`). A program takes one block of a segment's queries
(forward, and the query gradient) or keys (key and value gradients) for one head and loops over the other
side of that segment; the softmax is online, in base 2, and the forward keeps each row's log-sum-exp for
the backward. The query-gradient kernel runs first and also writes ``rowsum(out * grad_out)``, which the
key/value kernel reads. No atomics: the gradients are deterministic.
"""

from __future__ import annotations

import math

import torch

from dfmkit.components.attention.base import VarlenParams
from dfmkit.components.attention.torch_backend import sdpa_segments

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs of torch come without Triton
    triton = None

# Launch shapes by the length of the key segments (up to 128: captions; up to 512: 256-token images; longer), for
# the forward, the query-gradient and the key/value-gradient kernel; swept on a GPU by
# benchmarks/attention_kernels.py --sweep. A block of keys (BLOCK_N) near the key length wastes less of it.
LAUNCH = {
    128: dict(forward=dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=2),
              dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
              dkdv=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)),
    512: dict(forward=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
              dq=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
              dkdv=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
    None: dict(forward=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
               dq=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
               dkdv=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
}


def launch_shapes(max_seqlen_k: int) -> dict[str, dict]:
    """The launch shapes of the three kernels for key segments of at most ``max_seqlen_k``."""
    return next(shapes for limit, shapes in LAUNCH.items() if limit is None or max_seqlen_k <= limit)


LOG2E = 1.4426950408889634


def head_split(head_dim: int) -> tuple[int, int]:
    """The two power-of-two parts a head is computed in: 72 -> (64, 16), 64 -> (32, 32), 40 -> (32, 16)."""
    first = 1 << (head_dim.bit_length() - 1)
    if first == head_dim:
        first //= 2
    return first, max(16, 1 << (head_dim - first - 1).bit_length())


def supports(head_dim: int) -> bool:
    return head_dim % 8 == 0 and 32 <= head_dim <= 256


def available(q: torch.Tensor) -> bool:
    """Whether the kernels take ``q``: Triton present, CUDA, half precision, a head dim they handle."""
    return triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and supports(q.shape[-1])


if triton is not None:

    @triton.jit
    def _load_head(ptr, rows, mask, stride_t, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
        """Rows ``rows`` of one head as its two parts, ``[rows, D0]`` and ``[rows, D1]`` (channels past D as zeros)."""
        offsets = rows.to(tl.int64)[:, None] * stride_t
        first = tl.arange(0, D0)
        second = D0 + tl.arange(0, D1)
        a = tl.load(ptr + offsets + first[None, :], mask=mask[:, None], other=0.0)
        b = tl.load(ptr + offsets + second[None, :], mask=mask[:, None] & (second < D)[None, :], other=0.0)
        return a, b

    @triton.jit
    def _store_head(ptr, rows, mask, stride_t, a, b, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
        offsets = rows.to(tl.int64)[:, None] * stride_t
        first = tl.arange(0, D0)
        second = D0 + tl.arange(0, D1)
        tl.store(ptr + offsets + first[None, :], a.to(ptr.dtype.element_ty), mask=mask[:, None])
        tl.store(ptr + offsets + second[None, :], b.to(ptr.dtype.element_ty), mask=mask[:, None] & (second < D)[None, :])

    @triton.jit
    def _segment(CU_Q, CU_K, segment):
        return (tl.load(CU_Q + segment), tl.load(CU_Q + segment + 1), tl.load(CU_K + segment),
                tl.load(CU_K + segment + 1))

    @triton.jit
    def _forward(Q, K, V, O, LSE, CU_Q, CU_K, qk_scale, n_q, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                 stride_vh, stride_ot, stride_oh, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        block, segment, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q_start, q_end, k_start, k_end = _segment(CU_Q, CU_K, segment)
        rows = q_start + block * BLOCK_M + tl.arange(0, BLOCK_M)
        if q_start + block * BLOCK_M < q_end:
            row_mask = rows < q_end
            q0, q1 = _load_head(Q + head * stride_qh, rows, row_mask, stride_qt, D, D0, D1)
            m = tl.full([BLOCK_M], -float("inf"), tl.float32)
            total = tl.zeros([BLOCK_M], tl.float32)
            acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
            acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
            for start in range(k_start, k_end, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_mask = cols < k_end
                k0, k1 = _load_head(K + head * stride_kh, cols, col_mask, stride_kt, D, D0, D1)
                v0, v1 = _load_head(V + head * stride_vh, cols, col_mask, stride_vt, D, D0, D1)
                s = tl.dot(q1, tl.trans(k1), tl.dot(q0, tl.trans(k0))) * qk_scale
                s = tl.where(col_mask[None, :], s, -float("inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                p = tl.math.exp2(s - m_new[:, None])
                alpha = tl.math.exp2(m - m_new)
                total = total * alpha + tl.sum(p, 1)
                p = p.to(v0.dtype)
                acc0 = tl.dot(p, v0, acc0 * alpha[:, None])
                acc1 = tl.dot(p, v1, acc1 * alpha[:, None])
                m = m_new
            _store_head(O + head * stride_oh, rows, row_mask, stride_ot, acc0 / total[:, None], acc1 / total[:, None],
                        D, D0, D1)
            tl.store(LSE + head.to(tl.int64) * n_q + rows, m + tl.math.log2(total), mask=row_mask)

    @triton.jit
    def _backward_dq(Q, K, V, O, DO, DQ, LSE, DELTA, CU_Q, CU_K, qk_scale, sm_scale, n_q, stride_qt, stride_qh,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_dot, stride_doh,
                     stride_dqt, stride_dqh, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The query gradient of a block of queries; writes ``rowsum(out * grad_out)`` for the key/value kernel."""
        block, segment, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q_start, q_end, k_start, k_end = _segment(CU_Q, CU_K, segment)
        rows = q_start + block * BLOCK_M + tl.arange(0, BLOCK_M)
        if q_start + block * BLOCK_M < q_end:
            row_mask = rows < q_end
            q0, q1 = _load_head(Q + head * stride_qh, rows, row_mask, stride_qt, D, D0, D1)
            do0, do1 = _load_head(DO + head * stride_doh, rows, row_mask, stride_dot, D, D0, D1)
            o0, o1 = _load_head(O + head * stride_oh, rows, row_mask, stride_ot, D, D0, D1)
            delta = (tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
                     + tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1))
            stats = head.to(tl.int64) * n_q + rows
            tl.store(DELTA + stats, delta, mask=row_mask)
            lse = tl.load(LSE + stats, mask=row_mask, other=0.0)
            dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
            dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
            for start in range(k_start, k_end, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_mask = cols < k_end
                k0, k1 = _load_head(K + head * stride_kh, cols, col_mask, stride_kt, D, D0, D1)
                v0, v1 = _load_head(V + head * stride_vh, cols, col_mask, stride_vt, D, D0, D1)
                s = tl.dot(q1, tl.trans(k1), tl.dot(q0, tl.trans(k0)))
                p = tl.where(col_mask[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
                dp = tl.dot(do1, tl.trans(v1), tl.dot(do0, tl.trans(v0)))
                ds = (p * (dp - delta[:, None])).to(k0.dtype)
                dq0 = tl.dot(ds, k0, dq0)
                dq1 = tl.dot(ds, k1, dq1)
            _store_head(DQ + head * stride_dqh, rows, row_mask, stride_dqt, dq0 * sm_scale, dq1 * sm_scale, D, D0, D1)

    @triton.jit
    def _backward_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K, qk_scale, sm_scale, n_q, stride_qt, stride_qh,
                       stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dkt, stride_dkh,
                       D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        """The key and value gradients of a block of keys, the scores computed transposed (keys as rows)."""
        block, segment, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q_start, q_end, k_start, k_end = _segment(CU_Q, CU_K, segment)
        cols = k_start + block * BLOCK_N + tl.arange(0, BLOCK_N)
        if k_start + block * BLOCK_N < k_end:
            col_mask = cols < k_end
            k0, k1 = _load_head(K + head * stride_kh, cols, col_mask, stride_kt, D, D0, D1)
            v0, v1 = _load_head(V + head * stride_vh, cols, col_mask, stride_vt, D, D0, D1)
            dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
            dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
            dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
            dv1 = tl.zeros([BLOCK_N, D1], tl.float32)
            for start in range(q_start, q_end, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                row_mask = rows < q_end
                q0, q1 = _load_head(Q + head * stride_qh, rows, row_mask, stride_qt, D, D0, D1)
                do0, do1 = _load_head(DO + head * stride_doh, rows, row_mask, stride_dot, D, D0, D1)
                stats = head.to(tl.int64) * n_q + rows
                lse = tl.load(LSE + stats, mask=row_mask, other=0.0)
                delta = tl.load(DELTA + stats, mask=row_mask, other=0.0)
                s_t = tl.dot(k1, tl.trans(q1), tl.dot(k0, tl.trans(q0)))
                p_t = tl.where(row_mask[None, :], tl.math.exp2(s_t * qk_scale - lse[None, :]), 0.0)
                dv0 = tl.dot(p_t.to(do0.dtype), do0, dv0)
                dv1 = tl.dot(p_t.to(do0.dtype), do1, dv1)
                dp_t = tl.dot(v1, tl.trans(do1), tl.dot(v0, tl.trans(do0)))
                ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)
                dk0 = tl.dot(ds_t, q0, dk0)
                dk1 = tl.dot(ds_t, q1, dk1)
            _store_head(DK + head * stride_dkh, cols, col_mask, stride_dkt, dk0 * sm_scale, dk1 * sm_scale, D, D0, D1)
            _store_head(DV + head * stride_dkh, cols, col_mask, stride_dkt, dv0, dv1, D, D0, D1)


def _channels_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _constants(head_dim: int, config: dict) -> dict:
    first, second = head_split(head_dim)
    return dict(D=head_dim, D0=first, D1=second, **config)


def _grid(max_seqlen: int, block: int, segments: int, heads: int) -> tuple[int, int, int]:
    return (triton.cdiv(max(max_seqlen, 1), block), segments, heads)


def run_forward(q, k, v, cu_q, cu_k, max_q: int, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel with launch shape ``config``: ``(out [Tq, H, D], lse [H, Tq])``, the log-sum-exp of each
    row's scaled scores in base 2. ``q, k, v`` have contiguous channels."""
    tokens, heads, head_dim = q.shape
    out = q.new_empty(q.shape)
    lse = torch.empty((heads, tokens), dtype=torch.float32, device=q.device)
    _forward[_grid(max_q, config["BLOCK_M"], cu_q.shape[0] - 1, heads)](
        q, k, v, out, lse, cu_q, cu_k, LOG2E / math.sqrt(head_dim), tokens, *q.stride()[:2], *k.stride()[:2],
        *v.stride()[:2], *out.stride()[:2], **_constants(head_dim, config))
    return out, lse


def run_backward_dq(q, k, v, out, lse, grad, cu_q, cu_k, max_q: int, config: dict):
    """``(grad_q, delta)``: the query-gradient kernel, which also writes ``rowsum(out * grad) [H, Tq]``."""
    tokens, heads, head_dim = q.shape
    sm_scale = 1 / math.sqrt(head_dim)
    grad_q, delta = q.new_empty(q.shape), torch.empty_like(lse)
    _backward_dq[_grid(max_q, config["BLOCK_M"], cu_q.shape[0] - 1, heads)](
        q, k, v, out, grad, grad_q, lse, delta, cu_q, cu_k, sm_scale * LOG2E, sm_scale, tokens, *q.stride()[:2],
        *k.stride()[:2], *v.stride()[:2], *out.stride()[:2], *grad.stride()[:2], *grad_q.stride()[:2],
        **_constants(head_dim, config))
    return grad_q, delta


def run_backward_dkdv(q, k, v, grad, lse, delta, cu_q, cu_k, max_k: int, config: dict):
    """``(grad_k, grad_v)``: the key/value-gradient kernel."""
    tokens, heads, head_dim = q.shape
    sm_scale = 1 / math.sqrt(head_dim)
    grad_k, grad_v = k.new_empty(k.shape), k.new_empty(k.shape)
    _backward_dkdv[_grid(max_k, config["BLOCK_N"], cu_q.shape[0] - 1, heads)](
        q, k, v, grad, grad_k, grad_v, lse, delta, cu_q, cu_k, sm_scale * LOG2E, sm_scale, tokens, *q.stride()[:2],
        *k.stride()[:2], *v.stride()[:2], *grad.stride()[:2], *grad_k.stride()[:2], **_constants(head_dim, config))
    return grad_k, grad_v


# The launches are custom operators: torch.compile keeps them whole in its graphs (see adaln_kernels).
@torch.library.custom_op("dfmkit::flash_attention_forward", mutates_args=())
def _launch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                    max_q: int, max_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_channels_contiguous(t) for t in (q, k, v))
    return run_forward(q, k, v, cu_q, cu_k, max_q, launch_shapes(max_k)["forward"])


@_launch_forward.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("dfmkit::flash_attention_backward", mutates_args=())
def _launch_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     grad: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
                     max_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, grad = (_channels_contiguous(t) for t in (q, k, v, out, grad))
    shapes = launch_shapes(max_k)
    grad_q, delta = run_backward_dq(q, k, v, out, lse, grad, cu_q, cu_k, max_q, shapes["dq"])
    return (grad_q, *run_backward_dkdv(q, k, v, grad, lse, delta, cu_q, cu_k, max_k, shapes["dkdv"]))


@_launch_backward.register_fake
def _(q, k, v, out, lse, grad, cu_q, cu_k, max_q, max_k):
    return q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k):
        out, lse = _launch_forward(q, k, v, cu_q, cu_k, max_q, max_k)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.max_q, ctx.max_k = max_q, max_k
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        grad_q, grad_k, grad_v = _launch_backward(q, k, v, out, lse, grad, cu_q, cu_k, ctx.max_q, ctx.max_k)
        return grad_q, grad_k, grad_v, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: VarlenParams) -> torch.Tensor:
    """Packed attention through the kernels (where Triton runs: CUDA, or its interpreter on CPU tensors)."""
    return _FlashAttention.apply(q, k, v, params.cu_seqlens_q, params.cu_seqlens_k, params.max_seqlen_q,
                                 params.max_seqlen_k)


class TritonAttention(torch.nn.Module):
    """The kernels on CUDA bf16/fp16 for head dims of 32-256 in steps of 8, per-segment SDPA elsewhere."""

    def forward(self, q, k, v, params: VarlenParams):
        if available(q):
            return flash_attention(q, k, v, params)
        return sdpa_segments(q, k, v, params)


def build(options, **_context) -> torch.nn.Module:
    return TritonAttention()
