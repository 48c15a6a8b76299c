"""Self-attention's fused qkv projection into q, k, v as Triton kernels (CUDA, half precision): per-head
RMSNorm of q and k, the rotary embedding, and the split, in one kernel each way.

    split_qkv(qkv [L, 1, H * 3 * D], q_weight [D], k_weight [D], eps, cos, sin) -> q, k, v  (each [L, H, D])
        q = rope(rms_norm(qkv[..., q] ) * q_weight),  k likewise,  v = qkv[..., v]

A head's channels in ``qkv`` are ``[q | k | v]`` (megatron's per-head interleaving). ``cos``/``sin`` are
``[L, 1, D]`` (:func:`~dfmkit.components.backbones.dit.rope3d`) or None for no rotation; channel j is
rotated with channel j + D/2 (rotate-half) by one angle, so the kernels read only the first half of each.

Why: compiled by inductor, the norms and rotation took 34 ms of a 333 ms DiT-XL step on an H100 (128 x 256
tokens), three times what their memory traffic needs, and the backward then assembled the qkv gradient
from three pieces. Here the forward reads qkv once and writes q, k and v (v contiguous, as attention
kernels prefer); the backward reads the three output gradients and q and k, and writes the qkv gradient
whole, with per-program partial sums for the two norm weights (no atomics: deterministic). A tile holds
whole tokens (all heads), so each token's angles are loaded once and broadcast over its heads. The torch code
in :mod:`~dfmkit.components.backbones.dit` is the reference and the path wherever :func:`available` is false.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs of torch come without Triton
    triton = None

# Launch shapes, swept on an H100 by benchmarks/fused_kernels.py. A tile is tokens x all heads x half a head.
TOKENS_PER_TILE = 1
TILES_PER_PROGRAM = 8  # tiles per backward program: one partial sum of the weight gradients each
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
    def _tile(start, n_tokens, HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
              BLOCK_HALF: tl.constexpr, TOKENS: tl.constexpr, ROPE: tl.constexpr, COS, SIN):
        """Offsets of a tile (tokens from ``start``, all heads, the first half of a head) from the tile's first
        token, in qkv (``source``: q; k at +D, v at +2D) and in q, k, v (``out``); the norm statistics' rows;
        and the tile's rotation angles, one per token and channel pair, broadcast over the heads."""
        tokens = tl.arange(0, TOKENS)
        heads = tl.arange(0, BLOCK_HEADS)
        cols = tl.arange(0, BLOCK_HALF)
        token_mask = start + tokens < n_tokens
        mask = token_mask[:, None, None] & (heads < HEADS)[None, :, None] & (cols < HALF)[None, None, :]
        source = tokens[:, None, None] * (HEADS * 3 * D) + heads[None, :, None] * (3 * D) + cols[None, None, :]
        out = tokens[:, None, None] * (HEADS * D) + heads[None, :, None] * D + cols[None, None, :]
        stats = (start + tokens)[:, None] * HEADS + heads[None, :]
        stats_mask = token_mask[:, None] & (heads < HEADS)[None, :]
        cos = tl.zeros([TOKENS, 1, BLOCK_HALF], tl.float32)
        sin = tl.zeros([TOKENS, 1, BLOCK_HALF], tl.float32)
        if ROPE:  # rope3d gives both halves of a head the same angles: the first half's serve both
            angles = (start.to(tl.int64) + tokens)[:, None] * D + cols[None, :]
            angle_mask = token_mask[:, None] & (cols < HALF)[None, :]
            cos = tl.load(COS + angles, mask=angle_mask, other=0.0).to(tl.float32)[:, None, :]
            sin = tl.load(SIN + angles, mask=angle_mask, other=0.0).to(tl.float32)[:, None, :]
        return mask, source, out, stats, stats_mask, cols, cos, sin

    @triton.jit
    def _norm_rope(QKV, W, OUT, RSTD, source, out, stats, stats_mask, mask, cols, cos, sin, eps, D: tl.constexpr,
                   HALF: tl.constexpr, ROPE: tl.constexpr):
        a, b = _load_halves(QKV, source, mask, HALF)
        rstd = tl.rsqrt((tl.sum(a * a, 2) + tl.sum(b * b, 2)) / D + eps)
        a = a * rstd[:, :, None] * tl.load(W + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, None, :]
        b = b * rstd[:, :, None] * tl.load(W + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, None, :]
        if ROPE:
            a, b = a * cos - b * sin, b * cos + a * sin
        _store_halves(OUT, out, mask, a, b, HALF)
        tl.store(RSTD + stats, rstd, mask=stats_mask)

    @triton.jit(do_not_specialize=["n_tokens"])  # pack sizes: no recompile when their divisibility changes
    def _forward(QKV, WQ, WK, COS, SIN, Q, K, V, RSTD, n_tokens, eps, HEADS: tl.constexpr,
                 BLOCK_HEADS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 TOKENS: tl.constexpr, ROPE: tl.constexpr):
        start = tl.program_id(0) * TOKENS
        mask, source, out, stats, stats_mask, cols, cos, sin = _tile(start, n_tokens, HEADS, BLOCK_HEADS, D, HALF,
                                                                     BLOCK_HALF, TOKENS, ROPE, COS, SIN)
        QKV += start.to(tl.int64) * (HEADS * 3 * D)  # 64-bit tile bases, 32-bit offsets within a tile
        Q += start.to(tl.int64) * (HEADS * D)
        K += start.to(tl.int64) * (HEADS * D)
        V += start.to(tl.int64) * (HEADS * D)
        _norm_rope(QKV, WQ, Q, RSTD, source, out, stats, stats_mask, mask, cols, cos, sin, eps, D, HALF, ROPE)
        _norm_rope(QKV + D, WK, K, RSTD + n_tokens * HEADS, source, out, stats, stats_mask, mask, cols, cos, sin, eps,
                   D, HALF, ROPE)
        v_a, v_b = _load_halves(QKV + 2 * D, source, mask, HALF)
        _store_halves(V, out, mask, v_a, v_b, HALF)

    @triton.jit
    def _norm_rope_backward(QKV, W, GRAD_OUT, GRAD_QKV, RSTD, source, out, stats, stats_mask, mask, cols, cos, sin,
                            D: tl.constexpr, HALF: tl.constexpr, ROPE: tl.constexpr):
        """Writes the input gradient; returns this tile's terms of the weight gradient (two halves), to be summed
        once per program: summing each tile across heads would cost a round through shared memory per tile."""
        g_a, g_b = _load_halves(GRAD_OUT, out, mask, HALF)
        if ROPE:  # the rotation's transpose
            g_a, g_b = g_a * cos + g_b * sin, g_b * cos - g_a * sin
        a, b = _load_halves(QKV, source, mask, HALF)
        rstd = tl.load(RSTD + stats, mask=stats_mask, other=0.0)[:, :, None]
        a, b = a * rstd, b * rstd  # the normalised input
        terms_a, terms_b = g_a * a, g_b * b
        g_a = g_a * tl.load(W + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, None, :]
        g_b = g_b * tl.load(W + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, None, :]
        mean = ((tl.sum(g_a * a, 2) + tl.sum(g_b * b, 2)) / D)[:, :, None]
        _store_halves(GRAD_QKV, source, mask, rstd * (g_a - a * mean), rstd * (g_b - b * mean), HALF)
        return terms_a, terms_b

    @triton.jit(do_not_specialize=["n_tokens"])  # pack sizes: no recompile when their divisibility changes
    def _backward(QKV, WQ, WK, COS, SIN, RSTD, GRAD_Q, GRAD_K, GRAD_V, GRAD_QKV, GRAD_W_PARTS, n_tokens,
                  HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, TOKENS: tl.constexpr, TILES: tl.constexpr, ROPE: tl.constexpr):
        program = tl.program_id(0)
        wq_a = tl.zeros([TOKENS, BLOCK_HEADS, BLOCK_HALF], tl.float32)
        wq_b = tl.zeros([TOKENS, BLOCK_HEADS, BLOCK_HALF], tl.float32)
        wk_a = tl.zeros([TOKENS, BLOCK_HEADS, BLOCK_HALF], tl.float32)
        wk_b = tl.zeros([TOKENS, BLOCK_HEADS, BLOCK_HALF], tl.float32)
        for tile in range(TILES):
            start = (program * TILES + tile) * TOKENS
            mask, source, out, stats, stats_mask, cols, cos, sin = _tile(start, n_tokens, HEADS, BLOCK_HEADS, D, HALF,
                                                                         BLOCK_HALF, TOKENS, ROPE, COS, SIN)
            qkv_base, out_base = start.to(tl.int64) * (HEADS * 3 * D), start.to(tl.int64) * (HEADS * D)
            qkv, grad_qkv = QKV + qkv_base, GRAD_QKV + qkv_base
            terms_a, terms_b = _norm_rope_backward(qkv, WQ, GRAD_Q + out_base, grad_qkv, RSTD, source, out, stats,
                                                   stats_mask, mask, cols, cos, sin, D, HALF, ROPE)
            wq_a += terms_a
            wq_b += terms_b
            terms_a, terms_b = _norm_rope_backward(qkv + D, WK, GRAD_K + out_base, grad_qkv + D,
                                                   RSTD + n_tokens * HEADS, source, out, stats, stats_mask, mask, cols,
                                                   cos, sin, D, HALF, ROPE)
            wk_a += terms_a
            wk_b += terms_b
            v_a, v_b = _load_halves(GRAD_V + out_base, out, mask, HALF)
            _store_halves(grad_qkv + 2 * D, source, mask, v_a, v_b, HALF)
        cols = tl.arange(0, BLOCK_HALF)
        parts = GRAD_W_PARTS + program * (2 * D) + cols
        tl.store(parts, tl.sum(tl.sum(wq_a, 1), 0), mask=cols < HALF)
        tl.store(parts + HALF, tl.sum(tl.sum(wq_b, 1), 0), mask=cols < HALF)
        tl.store(parts + D, tl.sum(tl.sum(wk_a, 1), 0), mask=cols < HALF)
        tl.store(parts + D + HALF, tl.sum(tl.sum(wk_b, 1), 0), mask=cols < HALF)


def _constants(heads: int, head_dim: int, rope: bool) -> dict:
    half = head_dim // 2
    return dict(HEADS=heads, BLOCK_HEADS=triton.next_power_of_2(heads), D=head_dim, HALF=half,
                BLOCK_HALF=triton.next_power_of_2(half), TOKENS=TOKENS_PER_TILE, ROPE=rope)


# The launches are custom operators: torch.compile keeps them whole in its graphs, with what they read and
# write declared (nothing they are given is written); see adaln_kernels for why.
@torch.library.custom_op("dfmkit::split_qkv_forward", mutates_args=())
def _launch_forward(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, heads: int, eps: float,
                    cos: torch.Tensor | None, sin: torch.Tensor | None) -> list[torch.Tensor]:
    """``[q, k, v, rstd [2, tokens * heads]]``."""
    tokens, head_dim = qkv.shape[0], qkv.shape[-1] // (3 * heads)
    q, k, v = (qkv.new_empty((tokens, heads, head_dim)) for _ in range(3))
    rstd = torch.empty((2, tokens * heads), dtype=torch.float32, device=qkv.device)
    rope = cos is not None
    _forward[(triton.cdiv(tokens, TOKENS_PER_TILE),)](
        qkv, q_weight, k_weight, cos if rope else q, sin if rope else q, q, k, v, rstd, tokens, eps,
        **_constants(heads, head_dim, rope), num_warps=FORWARD_WARPS,
    )
    return [q, k, v, rstd]


@_launch_forward.register_fake
def _(qkv, q_weight, k_weight, heads, eps, cos, sin):
    tokens, head_dim = qkv.shape[0], qkv.shape[-1] // (3 * heads)
    return [qkv.new_empty((tokens, heads, head_dim)) for _ in range(3)] + [
        qkv.new_empty((2, tokens * heads), dtype=torch.float32)]


@torch.library.custom_op("dfmkit::split_qkv_backward", mutates_args=())
def _launch_backward(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, heads: int,
                     cos: torch.Tensor | None, sin: torch.Tensor | None, rstd: torch.Tensor, grad_q: torch.Tensor,
                     grad_k: torch.Tensor, grad_v: torch.Tensor) -> list[torch.Tensor]:
    """``[grad_qkv, grad_weights [2, D]: q, k]``."""
    tokens, head_dim = qkv.shape[0], qkv.shape[-1] // (3 * heads)
    programs = triton.cdiv(tokens, TOKENS_PER_TILE * TILES_PER_PROGRAM)
    grad_qkv = torch.empty_like(qkv)
    grad_w_parts = torch.empty((programs, 2, head_dim), dtype=torch.float32, device=qkv.device)
    rope = cos is not None
    _backward[(programs,)](
        qkv, q_weight, k_weight, cos if rope else qkv, sin if rope else qkv, rstd, grad_q.contiguous(),
        grad_k.contiguous(), grad_v.contiguous(), grad_qkv, grad_w_parts, tokens,
        TILES=TILES_PER_PROGRAM, **_constants(heads, head_dim, rope), num_warps=BACKWARD_WARPS,
    )
    return [grad_qkv, grad_w_parts.sum(0).to(q_weight.dtype)]


@_launch_backward.register_fake
def _(qkv, q_weight, k_weight, heads, cos, sin, rstd, grad_q, grad_k, grad_v):
    head_dim = qkv.shape[-1] // (3 * heads)
    return [torch.empty_like(qkv), q_weight.new_empty((2, head_dim))]


class _SplitQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, q_weight, k_weight, heads, eps, cos, sin):
        q, k, v, rstd = _launch_forward(qkv, q_weight, k_weight, heads, eps, cos, sin)
        ctx.heads = heads
        ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin, rstd)
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        qkv, q_weight, k_weight, cos, sin, rstd = ctx.saved_tensors
        grad_qkv, grad_w = _launch_backward(qkv, q_weight, k_weight, ctx.heads, cos, sin, rstd, grad_q, grad_k, grad_v)
        return grad_qkv, grad_w[0], grad_w[1], None, None, None, None


def split_qkv(qkv: torch.Tensor, heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
              rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v)``, each ``[L, heads, D]``; see the module docstring. Only where :func:`available`."""
    cos, sin = rope if rope is not None else (None, None)
    if cos is not None and not (cos.is_contiguous() and sin.is_contiguous()):
        cos, sin = cos.contiguous(), sin.contiguous()
    return _SplitQKV.apply(qkv, q_weight.to(qkv.dtype), k_weight.to(qkv.dtype), heads, eps, cos, sin)
