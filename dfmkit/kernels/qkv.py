"""The attention projections split into heads as Triton kernels (CUDA, half precision): per-head RMSNorm
of the queries and keys, the rotary embedding, and the split, in one kernel each way.

    split_qkv(qkv [L, 1, H * 3 * D], q_weight [D], k_weight [D], eps, cos, sin) -> q, k, v  (each [L, H, D])
        q = rope(rms_norm(qkv[..., q] ) * q_weight),  k likewise,  v = qkv[..., v]
    split_kv(kv [L, 1, H * 2 * D], k_weight, eps) -> k, v           cross-attention's text keys and values
    norm_heads(x [L, 1, H * D], weight, eps) -> q                   cross-attention's queries

A head's channels in ``qkv`` are ``[q | k | v]`` (megatron's per-head interleaving), in ``kv`` ``[k | v]``.
``cos``/``sin`` are ``[L, 1, D]`` (:func:`~dfmkit.components.backbones.dit.layers.rope3d`) or None for no
rotation; channel j is rotated with channel j + D/2 (rotate-half) by one angle, so the kernels read only the first
half of each.

Why: compiled by inductor, the norms and rotation took 34 ms of a 333 ms DiT-XL step on an H100 (128 x 256
tokens), three times what their memory traffic needs, and the backward then assembled the qkv gradient
from three pieces. Here the forward reads qkv once and writes q, k and v (v contiguous, as attention
kernels prefer); the backward reads the three output gradients and q and k, and writes the qkv gradient
whole, with per-program partial sums for the two norm weights (no atomics: deterministic). A tile holds
whole tokens (all heads), so each token's angles are loaded once and broadcast over its heads. The same kernels
do cross-attention's query norm and its text keys' norm with the values' split. The torch code in
:mod:`~dfmkit.components.backbones.dit.attention` is the reference and the path wherever :func:`available` is false.
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


def available(src: torch.Tensor) -> bool:
    """Whether the kernels take the projection ``src``: CUDA, half precision, contiguous, not empty."""
    return (triton is not None and src.is_cuda and src.dtype in (torch.bfloat16, torch.float16) and src.is_contiguous()
            and src.numel() > 0)


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
              BLOCK_HALF: tl.constexpr, TOKENS: tl.constexpr, PARTS: tl.constexpr, ROPE: tl.constexpr, COS, SIN):
        """Offsets of a tile (tokens from ``start``, all heads, the first half of a head) from the tile's first
        token, in the projection (``source``: its first part; the others at +D, +2D) and in each output
        (``out``); the norm statistics' rows; and the tile's rotation angles, one per token and channel pair,
        broadcast over the heads."""
        tokens = tl.arange(0, TOKENS)
        heads = tl.arange(0, BLOCK_HEADS)
        cols = tl.arange(0, BLOCK_HALF)
        token_mask = start + tokens < n_tokens
        mask = token_mask[:, None, None] & (heads < HEADS)[None, :, None] & (cols < HALF)[None, None, :]
        source = tokens[:, None, None] * (HEADS * PARTS * D) + heads[None, :, None] * (PARTS * D) + cols[None, None, :]
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
    def _forward(SRC, W0, W1, COS, SIN, OUT0, OUT1, COPY, RSTD, n_tokens, eps, HEADS: tl.constexpr,
                 BLOCK_HEADS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 TOKENS: tl.constexpr, NORMED: tl.constexpr, COPIED: tl.constexpr, ROPE: tl.constexpr):
        start = tl.program_id(0) * TOKENS
        mask, source, out, stats, stats_mask, cols, cos, sin = _tile(start, n_tokens, HEADS, BLOCK_HEADS, D, HALF,
                                                                     BLOCK_HALF, TOKENS, NORMED + COPIED, ROPE, COS, SIN)
        SRC += start.to(tl.int64) * (HEADS * (NORMED + COPIED) * D)  # 64-bit tile bases, 32-bit offsets in a tile
        _norm_rope(SRC, W0, OUT0 + start.to(tl.int64) * (HEADS * D), RSTD, source, out, stats, stats_mask, mask, cols,
                   cos, sin, eps, D, HALF, ROPE)
        if NORMED == 2:
            _norm_rope(SRC + D, W1, OUT1 + start.to(tl.int64) * (HEADS * D), RSTD + n_tokens * HEADS, source, out,
                       stats, stats_mask, mask, cols, cos, sin, eps, D, HALF, ROPE)
        if COPIED:
            copy_a, copy_b = _load_halves(SRC + NORMED * D, source, mask, HALF)
            _store_halves(COPY + start.to(tl.int64) * (HEADS * D), out, mask, copy_a, copy_b, HALF)

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
    def _backward(SRC, W0, W1, COS, SIN, RSTD, GRAD0, GRAD1, GRAD_COPY, GRAD_SRC, GRAD_W_PARTS, n_tokens,
                  HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, TOKENS: tl.constexpr, TILES: tl.constexpr, NORMED: tl.constexpr,
                  COPIED: tl.constexpr, ROPE: tl.constexpr):
        program = tl.program_id(0)
        w0_a = tl.zeros([TOKENS, BLOCK_HEADS, BLOCK_HALF], tl.float32)
        w0_b = tl.zeros([TOKENS, BLOCK_HEADS, BLOCK_HALF], tl.float32)
        w1_a = tl.zeros([TOKENS, BLOCK_HEADS, BLOCK_HALF], tl.float32)
        w1_b = tl.zeros([TOKENS, BLOCK_HEADS, BLOCK_HALF], tl.float32)
        for tile in range(TILES):
            start = (program * TILES + tile) * TOKENS
            mask, source, out, stats, stats_mask, cols, cos, sin = _tile(start, n_tokens, HEADS, BLOCK_HEADS, D, HALF,
                                                                         BLOCK_HALF, TOKENS, NORMED + COPIED, ROPE,
                                                                         COS, SIN)
            src_base, out_base = start.to(tl.int64) * (HEADS * (NORMED + COPIED) * D), start.to(tl.int64) * (HEADS * D)
            src, grad_src = SRC + src_base, GRAD_SRC + src_base
            terms_a, terms_b = _norm_rope_backward(src, W0, GRAD0 + out_base, grad_src, RSTD, source, out, stats,
                                                   stats_mask, mask, cols, cos, sin, D, HALF, ROPE)
            w0_a += terms_a
            w0_b += terms_b
            if NORMED == 2:
                terms_a, terms_b = _norm_rope_backward(src + D, W1, GRAD1 + out_base, grad_src + D,
                                                       RSTD + n_tokens * HEADS, source, out, stats, stats_mask, mask,
                                                       cols, cos, sin, D, HALF, ROPE)
                w1_a += terms_a
                w1_b += terms_b
            if COPIED:
                copy_a, copy_b = _load_halves(GRAD_COPY + out_base, out, mask, HALF)
                _store_halves(grad_src + NORMED * D, source, mask, copy_a, copy_b, HALF)
        # Partials laid out [weight channel, program], so that their sum over programs reads contiguous rows.
        programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_HALF)
        parts = GRAD_W_PARTS + cols * programs + program
        tl.store(parts, tl.sum(tl.sum(w0_a, 1), 0), mask=cols < HALF)
        tl.store(parts + HALF * programs, tl.sum(tl.sum(w0_b, 1), 0), mask=cols < HALF)
        if NORMED == 2:
            tl.store(parts + D * programs, tl.sum(tl.sum(w1_a, 1), 0), mask=cols < HALF)
            tl.store(parts + (D + HALF) * programs, tl.sum(tl.sum(w1_b, 1), 0), mask=cols < HALF)


def _constants(heads: int, head_dim: int, normed: int, copied: bool, rope: bool) -> dict:
    half = head_dim // 2
    return dict(HEADS=heads, BLOCK_HEADS=triton.next_power_of_2(heads), D=head_dim, HALF=half,
                BLOCK_HALF=triton.next_power_of_2(half), TOKENS=TOKENS_PER_TILE, NORMED=normed, COPIED=copied,
                ROPE=rope)


def _shapes(src: torch.Tensor, heads: int, weights: list[torch.Tensor], copied: bool) -> tuple[int, int, int]:
    """(tokens, head_dim, outputs) of a projection ``[L, 1, heads * parts * D]``."""
    outputs = len(weights) + copied
    return src.shape[0], src.shape[-1] // (outputs * heads), outputs


# The launches are custom operators: torch.compile keeps them whole in its graphs, with what they read and
# write declared (nothing they are given is written); see kernels/adaln.py for why.
@torch.library.custom_op("dfmkit::split_heads_forward", mutates_args=())
def _launch_forward(src: torch.Tensor, weights: list[torch.Tensor], copied: bool, heads: int, eps: float,
                    cos: torch.Tensor | None, sin: torch.Tensor | None) -> list[torch.Tensor]:
    """``[*normed parts, copied part (if copied), rstd [normed, tokens * heads]]``."""
    tokens, head_dim, outputs = _shapes(src, heads, weights, copied)
    parts = [src.new_empty((tokens, heads, head_dim)) for _ in range(outputs)]
    rstd = torch.empty((len(weights), tokens * heads), dtype=torch.float32, device=src.device)
    rope, first = cos is not None, parts[0]
    _forward[(triton.cdiv(tokens, TOKENS_PER_TILE),)](
        src, weights[0], weights[-1], cos if rope else first, sin if rope else first, first,
        parts[1] if len(weights) == 2 else first, parts[-1], rstd, tokens, eps,
        **_constants(heads, head_dim, len(weights), copied, rope), num_warps=FORWARD_WARPS,
    )
    return parts + [rstd]


@_launch_forward.register_fake
def _(src, weights, copied, heads, eps, cos, sin):
    tokens, head_dim, outputs = _shapes(src, heads, weights, copied)
    return [src.new_empty((tokens, heads, head_dim)) for _ in range(outputs)] + [
        src.new_empty((len(weights), tokens * heads), dtype=torch.float32)]


@torch.library.custom_op("dfmkit::split_heads_backward", mutates_args=())
def _launch_backward(src: torch.Tensor, weights: list[torch.Tensor], copied: bool, heads: int,
                     cos: torch.Tensor | None, sin: torch.Tensor | None, rstd: torch.Tensor,
                     grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[grad_src, grad_weights [normed, D]]``."""
    tokens, head_dim, _ = _shapes(src, heads, weights, copied)
    programs = triton.cdiv(tokens, TOKENS_PER_TILE * TILES_PER_PROGRAM)
    grad_src = torch.empty_like(src)
    grad_w_parts = torch.empty((len(weights), head_dim, programs), dtype=torch.float32, device=src.device)
    grads = [g.contiguous() for g in grads]
    rope = cos is not None
    _backward[(programs,)](
        src, weights[0], weights[-1], cos if rope else src, sin if rope else src, rstd, grads[0],
        grads[1] if len(weights) == 2 else grads[0], grads[-1], grad_src, grad_w_parts, tokens,
        TILES=TILES_PER_PROGRAM, **_constants(heads, head_dim, len(weights), copied, rope), num_warps=BACKWARD_WARPS,
    )
    return [grad_src, grad_w_parts.sum(-1).to(weights[0].dtype)]


@_launch_backward.register_fake
def _(src, weights, copied, heads, cos, sin, rstd, grads):
    head_dim = _shapes(src, heads, weights, copied)[1]
    return [torch.empty_like(src), weights[0].new_empty((len(weights), head_dim))]


class _SplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, heads, eps, copied, cos, sin, *weights):
        *parts, rstd = _launch_forward(src, list(weights), copied, heads, eps, cos, sin)
        ctx.heads, ctx.copied = heads, copied
        ctx.save_for_backward(src, cos, sin, rstd, *weights)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        src, cos, sin, rstd, *weights = ctx.saved_tensors
        grads = [g if g is not None else src.new_zeros(rstd.shape[1] // ctx.heads, ctx.heads, src.shape[-1] //
                                                       (ctx.heads * len(grads))) for g in grads]
        grad_src, grad_w = _launch_backward(src, weights, ctx.copied, ctx.heads, cos, sin, rstd, list(grads))
        return grad_src, None, None, None, None, None, *grad_w.unbind(0)


def _split(src: torch.Tensor, heads: int, weights: list[torch.Tensor], copied: bool, eps: float,
           rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    cos, sin = rope if rope is not None else (None, None)
    if cos is not None and not (cos.is_contiguous() and sin.is_contiguous()):
        cos, sin = cos.contiguous(), sin.contiguous()
    weights = [w.to(src.dtype) for w in weights]
    # Without autograd (sampling) the op itself: torch 2.11's dynamo, tracing the autograd.Function's forward with
    # grad disabled, handed the op the Function's arguments shifted by one (the first tensor taken as ctx).
    if not torch.is_grad_enabled():
        return tuple(_launch_forward(src, weights, copied, heads, eps, cos, sin)[:-1])
    return _SplitHeads.apply(src, heads, eps, copied, cos, sin, *weights)


def split_qkv(qkv: torch.Tensor, heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
              rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention's ``(q, k, v)``, each ``[L, heads, D]``; see the module docstring. Only where :func:`available`."""
    return _split(qkv, heads, [q_weight, k_weight], True, eps, rope)


def split_kv(kv: torch.Tensor, heads: int, k_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention's keys and values from ``kv [L, 1, heads * 2 * D]`` (per head ``[k | v]``):
    ``(rms_norm(k) * k_weight, v)``, each ``[L, heads, D]``. Only where :func:`available`."""
    return _split(kv, heads, [k_weight], True, eps, None)


def norm_heads(x: torch.Tensor, heads: int, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Cross-attention's queries: ``rms_norm(x) * weight`` per head of ``x [L, 1, heads * D]``, as ``[L, heads, D]``.
    Only where :func:`available`."""
    return _split(x, heads, [weight], False, eps, None)[0]
