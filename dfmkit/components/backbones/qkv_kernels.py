"""Self-attention's fused qkv projection into q, k, v as Triton kernels (CUDA, half precision): per-head
RMSNorm of q and k, the rotary embedding, and the split, in one kernel each way.

    split_qkv(qkv [L, 1, H * 3 * D], q_weight [D], k_weight [D], eps, cos, sin) -> q, k, v  (each [L, H, D])
        q = rope(rms_norm(qkv[..., q] ) * q_weight),  k likewise,  v = qkv[..., v]

A head's channels in ``qkv`` are ``[q | k | v]`` (megatron's per-head interleaving). ``cos``/``sin`` are
``[L, 1, D]`` (:func:`~dfmkit.components.backbones.dit.rope3d`) or None for no rotation; channel j is
rotated with channel j + D/2 (rotate-half).

Why: compiled by inductor, the norms and rotation took 34 ms of a 333 ms DiT-XL step on an H100 (128 x 256
tokens), three times what their memory traffic needs, and the backward then assembled the qkv gradient
from three pieces. Here the forward reads qkv once and writes q, k and v (v contiguous, as attention
kernels prefer); the backward reads the three output gradients and q and k, and writes the qkv gradient
whole, with per-program partial sums for the two norm weights (no atomics: deterministic). The torch code
in :mod:`~dfmkit.components.backbones.dit` is the reference and the path wherever :func:`available` is false.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs of torch come without Triton
    triton = None

# Launch shapes, swept on an H100 by benchmarks/fused_kernels.py. Rows are (token, head) pairs.
ROWS_PER_TILE = 32  # rows a program handles at once
TILES_PER_PROGRAM = 4  # tiles per backward program: one partial sum of the weight gradients each
FORWARD_WARPS = 4
BACKWARD_WARPS = 4


def available(qkv: torch.Tensor) -> bool:
    """Whether the kernels take ``qkv``: CUDA, half precision, contiguous."""
    return triton is not None and qkv.is_cuda and qkv.dtype in (torch.bfloat16, torch.float16) and qkv.is_contiguous()


if triton is not None:

    @triton.jit
    def _load_halves(ptr, offsets, mask, HALF: tl.constexpr):
        first = tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        second = tl.load(ptr + offsets + HALF, mask=mask, other=0.0).to(tl.float32)
        return first, second

    @triton.jit
    def _store_halves(ptr, offsets, mask, first, second, HALF: tl.constexpr):
        tl.store(ptr + offsets, first.to(ptr.dtype.element_ty), mask=mask)
        tl.store(ptr + offsets + HALF, second.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_angles(COS, SIN, rows, heads, cols, mask, D: tl.constexpr, HALF: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, ROWS: tl.constexpr, ROPE: tl.constexpr):
        """cos and sin of each row's token, both halves; zeros without the rotation (then unused)."""
        cos_a = tl.zeros([ROWS, BLOCK_HALF], tl.float32)
        cos_b = tl.zeros([ROWS, BLOCK_HALF], tl.float32)
        sin_a = tl.zeros([ROWS, BLOCK_HALF], tl.float32)
        sin_b = tl.zeros([ROWS, BLOCK_HALF], tl.float32)
        if ROPE:
            angles = (rows // heads)[:, None] * D + cols[None, :]
            cos_a, cos_b = _load_halves(COS, angles, mask, HALF)
            sin_a, sin_b = _load_halves(SIN, angles, mask, HALF)
        return cos_a, cos_b, sin_a, sin_b

    @triton.jit
    def _norm_rope(QKV, W, OUT, RSTD, source, out, rows, row_mask, cols, col_mask, mask, cos_a, cos_b, sin_a, sin_b,
                   eps, D: tl.constexpr, HALF: tl.constexpr, ROPE: tl.constexpr):
        a, b = _load_halves(QKV, source, mask, HALF)
        rstd = tl.rsqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1)) / D + eps)
        a = a * rstd[:, None] * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        b = b * rstd[:, None] * tl.load(W + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if ROPE:
            a, b = a * cos_a - b * sin_a, b * cos_b + a * sin_b
        _store_halves(OUT, out, mask, a, b, HALF)
        tl.store(RSTD + rows, rstd, mask=row_mask)

    @triton.jit(do_not_specialize=["n_rows"])  # pack sizes: no recompile when their divisibility changes
    def _forward(QKV, WQ, WK, COS, SIN, Q, K, V, RSTD, n_rows, heads, eps, D: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, ROWS: tl.constexpr, ROPE: tl.constexpr):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # (token, head) pairs
        row_mask = rows < n_rows
        cols = tl.arange(0, BLOCK_HALF)
        col_mask = cols < HALF
        mask = row_mask[:, None] & col_mask[None, :]
        source = rows[:, None] * (3 * D) + cols[None, :]  # the row's q channels; k at +D, v at +2D
        out = rows[:, None] * D + cols[None, :]
        cos_a, cos_b, sin_a, sin_b = _load_angles(COS, SIN, rows, heads, cols, mask, D, HALF, BLOCK_HALF, ROWS, ROPE)
        _norm_rope(QKV, WQ, Q, RSTD, source, out, rows, row_mask, cols, col_mask, mask, cos_a, cos_b, sin_a, sin_b,
                   eps, D, HALF, ROPE)
        _norm_rope(QKV, WK, K, RSTD + n_rows, source + D, out, rows, row_mask, cols, col_mask, mask, cos_a, cos_b,
                   sin_a, sin_b, eps, D, HALF, ROPE)
        v_a, v_b = _load_halves(QKV, source + 2 * D, mask, HALF)
        _store_halves(V, out, mask, v_a, v_b, HALF)

    @triton.jit
    def _norm_rope_backward(QKV, W, GRAD_OUT, GRAD_QKV, RSTD, source, grads, rows, row_mask, cols, col_mask, mask,
                            cos_a, cos_b, sin_a, sin_b, D: tl.constexpr, HALF: tl.constexpr, ROPE: tl.constexpr):
        """Writes the input gradient; returns this tile's sums for the weight gradient (two halves)."""
        g_a, g_b = _load_halves(GRAD_OUT, grads, mask, HALF)
        if ROPE:  # the rotation's transpose
            g_a, g_b = g_a * cos_a + g_b * sin_b, g_b * cos_b - g_a * sin_a
        a, b = _load_halves(QKV, source, mask, HALF)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        a, b = a * rstd[:, None], b * rstd[:, None]  # the normalised input
        sum_a, sum_b = tl.sum(g_a * a, 0), tl.sum(g_b * b, 0)
        g_a = g_a * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        g_b = g_b * tl.load(W + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        mean = (tl.sum(g_a * a, 1) + tl.sum(g_b * b, 1)) / D
        _store_halves(GRAD_QKV, source, mask, rstd[:, None] * (g_a - a * mean[:, None]),
                      rstd[:, None] * (g_b - b * mean[:, None]), HALF)
        return sum_a, sum_b

    @triton.jit(do_not_specialize=["n_rows"])  # pack sizes: no recompile when their divisibility changes
    def _backward(QKV, WQ, WK, COS, SIN, RSTD, GRAD_Q, GRAD_K, GRAD_V, GRAD_QKV, GRAD_W_PARTS, n_rows, heads,
                  D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, ROWS: tl.constexpr,
                  TILES: tl.constexpr, ROPE: tl.constexpr):
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK_HALF)
        col_mask = cols < HALF
        wq_a = tl.zeros([BLOCK_HALF], tl.float32)
        wq_b = tl.zeros([BLOCK_HALF], tl.float32)
        wk_a = tl.zeros([BLOCK_HALF], tl.float32)
        wk_b = tl.zeros([BLOCK_HALF], tl.float32)
        for tile in range(TILES):
            rows = ((program * TILES + tile) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            source = rows[:, None] * (3 * D) + cols[None, :]
            grads = rows[:, None] * D + cols[None, :]
            cos_a, cos_b, sin_a, sin_b = _load_angles(COS, SIN, rows, heads, cols, mask, D, HALF, BLOCK_HALF, ROWS,
                                                      ROPE)
            sum_a, sum_b = _norm_rope_backward(QKV, WQ, GRAD_Q, GRAD_QKV, RSTD, source, grads, rows, row_mask, cols,
                                               col_mask, mask, cos_a, cos_b, sin_a, sin_b, D, HALF, ROPE)
            wq_a += sum_a
            wq_b += sum_b
            sum_a, sum_b = _norm_rope_backward(QKV, WK, GRAD_K, GRAD_QKV, RSTD + n_rows, source + D, grads, rows,
                                               row_mask, cols, col_mask, mask, cos_a, cos_b, sin_a, sin_b, D, HALF,
                                               ROPE)
            wk_a += sum_a
            wk_b += sum_b
            v_a, v_b = _load_halves(GRAD_V, grads, mask, HALF)
            _store_halves(GRAD_QKV, source + 2 * D, mask, v_a, v_b, HALF)
        parts = GRAD_W_PARTS + program * (2 * D) + cols
        tl.store(parts, wq_a, mask=col_mask)
        tl.store(parts + HALF, wq_b, mask=col_mask)
        tl.store(parts + D, wk_a, mask=col_mask)
        tl.store(parts + D + HALF, wk_b, mask=col_mask)


def _constants(head_dim: int, rope: bool) -> dict:
    half = head_dim // 2
    return dict(D=head_dim, HALF=half, BLOCK_HALF=triton.next_power_of_2(half), ROWS=ROWS_PER_TILE, ROPE=rope)


class _SplitQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, q_weight, k_weight, heads, eps, cos, sin):
        tokens, head_dim = qkv.shape[0], qkv.shape[-1] // (3 * heads)
        n_rows = tokens * heads
        q, k, v = (qkv.new_empty((tokens, heads, head_dim)) for _ in range(3))
        rstd = torch.empty((2, n_rows), dtype=torch.float32, device=qkv.device)
        rope = cos is not None
        _forward[(triton.cdiv(n_rows, ROWS_PER_TILE),)](
            qkv, q_weight, k_weight, cos if rope else q, sin if rope else q, q, k, v, rstd, n_rows, heads, eps,
            **_constants(head_dim, rope), num_warps=FORWARD_WARPS,
        )
        ctx.heads = heads
        ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin, rstd)
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        qkv, q_weight, k_weight, cos, sin, rstd = ctx.saved_tensors
        heads = ctx.heads
        tokens, head_dim = qkv.shape[0], qkv.shape[-1] // (3 * heads)
        n_rows = tokens * heads
        programs = triton.cdiv(n_rows, ROWS_PER_TILE * TILES_PER_PROGRAM)
        grad_qkv = torch.empty_like(qkv)
        # one spare row of zeros: with exactly one program a one-row buffer would make torch.compile guard on
        # that case and compile the layer again for it
        grad_w_parts = torch.zeros((programs + 1, 2, head_dim), dtype=torch.float32, device=qkv.device)
        rope = cos is not None
        _backward[(programs,)](
            qkv, q_weight, k_weight, cos if rope else qkv, sin if rope else qkv, rstd, grad_q.contiguous(),
            grad_k.contiguous(), grad_v.contiguous(), grad_qkv, grad_w_parts, n_rows, heads,
            TILES=TILES_PER_PROGRAM, **_constants(head_dim, rope), num_warps=BACKWARD_WARPS,
        )
        grad_w = grad_w_parts.sum(0).to(q_weight.dtype)
        return grad_qkv, grad_w[0], grad_w[1], None, None, None, None


def split_qkv(qkv: torch.Tensor, heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
              rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v)``, each ``[L, heads, D]``; see the module docstring. Only where :func:`available`."""
    cos, sin = rope if rope is not None else (None, None)
    if cos is not None and not (cos.is_contiguous() and sin.is_contiguous()):
        cos, sin = cos.contiguous(), sin.contiguous()
    return _SplitQKV.apply(qkv, q_weight.to(qkv.dtype), k_weight.to(qkv.dtype), heads, eps, cos, sin)
