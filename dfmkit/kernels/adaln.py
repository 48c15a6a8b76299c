"""The DiT's adaLN chain as Triton kernels (CUDA, half precision): gated residual, LayerNorm and modulation,
one kernel forward and one (plus a small reduction) backward.

    residual_norm_modulate(x, h, gate, shift, scale, seg, eps) -> (x_new, m)
        x_new = x + gate[sample] * h
        m     = LayerNorm(x_new) * (1 + scale[sample]) + shift[sample]      (LayerNorm without weights)
    norm_modulate(x, shift, scale, seg, eps) -> m                           (the same without the residual)

``x``, ``h`` are a layer's tokens ``[L, 1, D]``; ``gate``, ``shift``, ``scale`` are ``[N, D]`` per-sample
vectors (rows of the adaLN output, any row stride); ``seg`` is the layer's :class:`~dfmkit.components.
backbones.dit.layers.Segments`: which sample each token belongs to, with the tokens of a sample contiguous and
samples in order (as a pack lays them out, also after a sequence- or context-parallel split).

Why: compiled by inductor, this chain took 62 ms of a 333 ms DiT-XL step on an H100 (128 x 256 tokens),
about 2.5 times what its memory traffic needs: the backward recomputed the residual stream, kept the
normalised input in fp32 and read everything again for the per-sample sums. Here the forward reads x and
h and writes x_new and m; the backward reads the two output gradients, x_new and h and writes the two
input gradients, a token at a time while the next one loads, adding each sample's gradient sums into
per-program partials in registers (no atomics: the result is deterministic). The torch code in
:mod:`~dfmkit.components.backbones.dit.layers` is the reference and the path wherever :func:`available` is false.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs of torch come without Triton
    triton = None

# Launch shapes, swept on an H100 by benchmarks/fused_kernels.py. Rows are tokens.
FORWARD_ELEMENTS = 4096  # a forward program's tile: rows x next_power_of_2(hidden) elements
FORWARD_WARPS = 2
BACKWARD_ROWS = 32  # rows per backward program: one set of per-sample partial sums each
BACKWARD_WARPS = 2
MAX_HIDDEN = 8192  # one token's channels are held in registers


def available(x: torch.Tensor) -> bool:
    """Whether the kernels take ``x``: CUDA, half precision, contiguous, a width that fits in registers."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.is_contiguous()
            and x.shape[-1] <= MAX_HIDDEN)


if triton is not None:

    # pack sizes: no recompile when their divisibility changes
    @triton.jit(do_not_specialize=["n_rows", "h_rows"])
    def _forward(X, H, IDS, GATE, SHIFT, SCALE, X_OUT, M_OUT, MEAN, RSTD, n_rows, h_rows, mod_stride, gate_stride,
                 eps, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, RESIDUAL: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        cols = tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
        sample = tl.load(IDS + rows, mask=row_mask, other=0).to(tl.int64)
        per_sample = sample[:, None] * mod_stride + cols[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:  # rows from h_rows on have no residual (h = 0 there): x_new = x exactly
            h_mask = mask & (rows < h_rows)[:, None]
            h = tl.load(H + offsets, mask=h_mask, other=0.0).to(tl.float32)
            gate = tl.load(GATE + sample[:, None] * gate_stride + cols[None, :], mask=h_mask, other=0.0).to(tl.float32)
            x_new = (x + gate * h).to(X_OUT.dtype.element_ty)  # rounded as the stored residual stream is
            tl.store(X_OUT + offsets, x_new, mask=mask)
            x = x_new.to(tl.float32)
        mean = tl.sum(x, 1) / D
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, 1) / D + eps)
        scale = tl.load(SCALE + per_sample, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + per_sample, mask=mask, other=0.0).to(tl.float32)
        m = centred * rstd[:, None] * (1.0 + scale) + shift
        tl.store(M_OUT + offsets, m.to(M_OUT.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)

    @triton.jit
    def _store_partials(PARTS, slot, n_slots, cols, col_mask, acc_shift, acc_scale, acc_gate, D: tl.constexpr,
                        RESIDUAL: tl.constexpr):
        tl.store(PARTS + slot * D + cols, acc_shift, mask=col_mask)
        tl.store(PARTS + (n_slots + slot) * D + cols, acc_scale, mask=col_mask)
        if RESIDUAL:
            tl.store(PARTS + (2 * n_slots + slot) * D + cols, acc_gate, mask=col_mask)

    @triton.jit
    def _load_row(GRAD_M, GRAD_X_NEW, X_NEW, H, row, n_rows, cols, col_mask, D: tl.constexpr,
                  RESIDUAL: tl.constexpr):
        """One token's output gradients and inputs (zeros past the end), as fp32."""
        mask = cols < tl.where(row < n_rows, D, 0)  # one comparison: Triton 3.9's interpreter makes `&` of masks int32
        offsets = row.to(tl.int64) * D + cols
        grad_m = tl.load(GRAD_M + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X_NEW + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_x_new = grad_m
        h = grad_m
        if RESIDUAL:
            grad_x_new = tl.load(GRAD_X_NEW + offsets, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(H + offsets, mask=mask, other=0.0).to(tl.float32)
        return grad_m, x, grad_x_new, h

    @triton.jit(do_not_specialize=["n_rows", "n_slots"])  # pack sizes: no recompile when their divisibility changes
    def _backward(GRAD_M, GRAD_X_NEW, X_NEW, H, IDS, GATE, SCALE, MEAN, RSTD, GRAD_X, GRAD_H, PARTS, n_rows,
                  n_slots, mod_stride, gate_stride, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                  RESIDUAL: tl.constexpr):
        # Program p takes tokens [p * ROWS, (p + 1) * ROWS) one at a time, loading the next token while it
        # works on this one, and sums the per-sample gradients in registers; the sums of sample s go to
        # partial slot p + s. Samples are contiguous and in order, so no two (program, sample) pairs share a
        # slot and a sample's slots are consecutive. One token at a time keeps the registers few (many
        # programs per SM hide the memory latency) and the per-sample sums need no reduction across rows.
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < D
        first = program * ROWS
        current = tl.load(IDS + first).to(tl.int64)
        scale = tl.load(SCALE + current * mod_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        gate = scale
        if RESIDUAL:
            gate = tl.load(GATE + current * gate_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc_shift = tl.zeros([BLOCK_D], tl.float32)
        acc_scale = tl.zeros([BLOCK_D], tl.float32)
        acc_gate = tl.zeros([BLOCK_D], tl.float32)
        grad_m, x, grad_x_new, h = _load_row(GRAD_M, GRAD_X_NEW, X_NEW, H, first, n_rows, cols, col_mask, D, RESIDUAL)
        for i in range(ROWS):
            row = first + i
            ahead = _load_row(GRAD_M, GRAD_X_NEW, X_NEW, H, row + 1, tl.minimum(n_rows, first + ROWS), cols,
                              col_mask, D, RESIDUAL)
            valid = row < n_rows
            sample = tl.load(IDS + row, mask=valid, other=current).to(tl.int64)  # past the end: no change
            if sample != current:  # the previous sample's sums are complete
                _store_partials(PARTS, program + current, n_slots, cols, col_mask, acc_shift, acc_scale, acc_gate,
                                D, RESIDUAL)
                acc_shift = tl.zeros([BLOCK_D], tl.float32)
                acc_scale = tl.zeros([BLOCK_D], tl.float32)
                acc_gate = tl.zeros([BLOCK_D], tl.float32)
                current = sample
                scale = tl.load(SCALE + current * mod_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
                if RESIDUAL:
                    gate = tl.load(GATE + current * gate_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
            mask = cols < tl.where(valid, D, 0)
            rstd = tl.load(RSTD + row, mask=valid, other=0.0)
            x_hat = tl.where(col_mask, (x - tl.load(MEAN + row, mask=valid, other=0.0)) * rstd, 0.0)
            grad_x_hat = grad_m * (1.0 + scale)
            grad_x = rstd * (grad_x_hat - tl.sum(grad_x_hat, 0) / D - x_hat * (tl.sum(grad_x_hat * x_hat, 0) / D))
            acc_shift += grad_m
            acc_scale += grad_m * x_hat
            offsets = row.to(tl.int64) * D + cols
            if RESIDUAL:
                grad_x += grad_x_new
                acc_gate += grad_x * h
                tl.store(GRAD_H + offsets, (gate * grad_x).to(GRAD_H.dtype.element_ty), mask=mask)
            tl.store(GRAD_X + offsets, grad_x.to(GRAD_X.dtype.element_ty), mask=mask)
            grad_m, x, grad_x_new, h = ahead
        _store_partials(PARTS, program + current, n_slots, cols, col_mask, acc_shift, acc_scale, acc_gate, D, RESIDUAL)

    @triton.jit(do_not_specialize=["n_samples", "n_slots"])  # pack sizes: no recompile when their divisibility changes
    def _sum_partials(PARTS, BOUNDS, OUT, n_samples, n_slots, D: tl.constexpr, BLOCK: tl.constexpr,
                      ROWS: tl.constexpr):
        # Sample s's tokens are rows [BOUNDS[s], BOUNDS[s+1]); the programs that saw them wrote slots p + s.
        sample = tl.program_id(0)
        which = tl.program_id(2)  # shift, scale, gate
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        col_mask = cols < D
        first, last = tl.load(BOUNDS + sample), tl.load(BOUNDS + sample + 1)
        acc = tl.zeros([BLOCK], tl.float32)
        if last > first:  # a sample with no tokens here (sequence parallelism) has no partials
            for program in range(first // ROWS, (last - 1) // ROWS + 1):
                acc += tl.load(PARTS + (which * n_slots + program + sample) * D + cols, mask=col_mask, other=0.0)
        tl.store(OUT + (which * n_samples + sample) * D + cols, acc.to(OUT.dtype.element_ty), mask=col_mask)


def _block_d(width: int) -> int:
    return triton.next_power_of_2(width)


# The launches are custom operators: torch.compile keeps them whole in its graphs, with what they read and
# write declared (nothing they are given is written). Traced into the graph as plain Triton kernels, their
# loops made inductor count their inputs as mutated, and its CUDA graphs then re-recorded every step.
@torch.library.custom_op("dfmkit::adaln_forward", mutates_args=())
def _launch_forward(x: torch.Tensor, h: torch.Tensor | None, gate: torch.Tensor | None, shift: torch.Tensor,
                    scale: torch.Tensor, ids: torch.Tensor, eps: float) -> list[torch.Tensor]:
    """``[x_new, m, mean, rstd]`` with the residual (``h`` given; it may have fewer rows than ``x``, zero after
    them), ``[m, mean, rstd]`` without."""
    width = x.shape[-1]
    n_rows = x.numel() // width
    block_d = _block_d(width)
    block_m = max(1, FORWARD_ELEMENTS // block_d)
    m = torch.empty_like(x)
    x_new = torch.empty_like(x) if h is not None else m  # a placeholder pointer without the residual
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    residual = h is not None
    _forward[(triton.cdiv(n_rows, block_m),)](
        x, h if residual else x, ids, gate if residual else scale, shift, scale, x_new, m, mean, rstd, n_rows,
        h.numel() // width if residual else 0, scale.stride(0), gate.stride(0) if residual else 0, eps, D=width,
        BLOCK_D=block_d, BLOCK_M=block_m, RESIDUAL=residual, num_warps=FORWARD_WARPS,
    )
    return [x_new, m, mean, rstd] if residual else [m, mean, rstd]


@_launch_forward.register_fake
def _(x, h, gate, shift, scale, ids, eps):
    stats = [x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32) for _ in range(2)]
    return ([torch.empty_like(x)] if h is not None else []) + [torch.empty_like(x)] + stats


@torch.library.custom_op("dfmkit::adaln_backward", mutates_args=())
def _launch_backward(grad_m: torch.Tensor, grad_x_new: torch.Tensor | None, x_new: torch.Tensor,
                     h: torch.Tensor | None, gate: torch.Tensor | None, scale: torch.Tensor, ids: torch.Tensor,
                     bounds: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> list[torch.Tensor]:
    """``[grad_x, grad_h, per-sample sums [3, N, D]: shift, scale, gate]`` with the residual, ``[grad_x, sums
    [2, N, D]: shift, scale]`` without."""
    width = x_new.shape[-1]
    n_rows = x_new.numel() // width
    n_samples = bounds.shape[0] - 1
    residual = h is not None
    programs = triton.cdiv(n_rows, BACKWARD_ROWS)
    n_slots = programs + n_samples
    sums = 3 if residual else 2
    parts = torch.empty((sums, n_slots, width), dtype=torch.float32, device=x_new.device)
    grad_x = torch.empty_like(x_new)
    grad_h = torch.empty_like(x_new) if residual else grad_x
    grad_m = grad_m.contiguous()
    if residual:
        grad_x_new = grad_x_new.contiguous()
    _backward[(programs,)](
        grad_m, grad_x_new if residual else grad_m, x_new, h if residual else x_new, ids, gate if residual else scale,
        scale, mean, rstd, grad_x, grad_h, parts, n_rows, n_slots, scale.stride(0), gate.stride(0) if residual else 0,
        D=width, BLOCK_D=_block_d(width), ROWS=BACKWARD_ROWS, RESIDUAL=residual, num_warps=BACKWARD_WARPS,
    )
    per_sample = torch.empty((sums, n_samples, width), dtype=scale.dtype, device=x_new.device)
    block = 256
    _sum_partials[(n_samples, triton.cdiv(width, block), sums)](
        parts, bounds, per_sample, n_samples, n_slots, D=width, BLOCK=block, ROWS=BACKWARD_ROWS,
    )
    return [grad_x, grad_h, per_sample] if residual else [grad_x, per_sample]


@_launch_backward.register_fake
def _(grad_m, grad_x_new, x_new, h, gate, scale, ids, bounds, mean, rstd):
    residual = h is not None
    per_sample = scale.new_empty((3 if residual else 2, bounds.shape[0] - 1, x_new.shape[-1]))
    return [torch.empty_like(x_new)] + ([torch.empty_like(x_new)] if residual else []) + [per_sample]


class _NormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, ids, bounds, eps):
        m, mean, rstd = _launch_forward(x, None, None, shift, scale, ids, eps)
        ctx.save_for_backward(x, scale, ids, bounds, mean, rstd)
        return m

    @staticmethod
    def backward(ctx, grad_m):
        x, scale, ids, bounds, mean, rstd = ctx.saved_tensors
        grad_x, (grad_shift, grad_scale) = _launch_backward(grad_m, None, x, None, None, scale, ids, bounds, mean, rstd)
        return grad_x, grad_shift, grad_scale, None, None, None


class _ResidualNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, gate, shift, scale, ids, bounds, eps):
        x_new, m, mean, rstd = _launch_forward(x, h, gate, shift, scale, ids, eps)
        ctx.save_for_backward(x_new, h, gate, scale, ids, bounds, mean, rstd)
        return x_new, m

    @staticmethod
    def backward(ctx, grad_x_new, grad_m):
        x_new, h, gate, scale, ids, bounds, mean, rstd = ctx.saved_tensors
        grad_x, grad_h, (grad_shift, grad_scale, grad_gate) = _launch_backward(
            grad_m, grad_x_new, x_new, h, gate, scale, ids, bounds, mean, rstd)
        return grad_x, grad_h, grad_gate, grad_shift, grad_scale, None, None, None


def _same_stride(shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels index shift and scale with one sample stride (both are chunks of one adaLN output as a rule)."""
    return (shift, scale) if shift.stride(0) == scale.stride(0) else (shift.contiguous(), scale.contiguous())


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[sample]) + shift[sample]``; see the module docstring. Only where :func:`available`."""
    shift, scale = _same_stride(shift, scale)
    # Without autograd (sampling) the op itself: torch 2.11's dynamo, tracing the autograd.Function's forward with
    # grad disabled, handed the op the Function's arguments shifted by one (the first tensor taken as ctx).
    if not torch.is_grad_enabled():
        return _launch_forward(x, None, None, shift, scale, seg.ids, eps)[0]
    return _NormModulate.apply(x, shift, scale, seg.ids, seg.bounds, eps)


def residual_norm_modulate(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                           scale: torch.Tensor, seg, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + gate[sample] * h, norm_modulate(that))``; see the module docstring. Only where :func:`available`.
    ``gate`` may come from another adaLN output than ``shift`` and ``scale`` (the last layer's MLP gate). Without
    autograd ``h`` may have fewer rows than ``x`` (a branch the tokens after them skipped): zero for the rest."""
    shift, scale = _same_stride(shift, scale)
    if not torch.is_grad_enabled():  # without autograd the op itself (see norm_modulate)
        x_new, m, _, _ = _launch_forward(x, h.contiguous(), gate, shift, scale, seg.ids, eps)
        return x_new, m
    return _ResidualNormModulate.apply(x, h.contiguous(), gate, shift, scale, seg.ids, seg.bounds, eps)
