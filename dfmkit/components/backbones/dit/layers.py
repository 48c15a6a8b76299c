"""The DiT's small pieces: per-head RMSNorm, adaLN modulation of packed samples, 3D RoPE and 3D sin-cos, the
timestep embedding and the adaLN projection.

Packed samples: a layer holds the tokens of several samples one after the other (``[L, 1, D]``), and every
per-sample vector (shift, scale, gate: ``[N, D]``) applies to its sample's tokens; :class:`Segments` says which
tokens those are. :func:`norm_modulate` and :func:`residual_norm_modulate` are the adaLN chain a DiT layer runs
between its branches; with ``fused`` they run as the Triton kernels of :mod:`dfmkit.kernels.adaln` where those
take the input (CUDA, half precision), and the torch code here is their reference everywhere else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dfmkit import kernels


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim (per-head QK norm); PyTorch's fused
    ``rms_norm`` accumulates in fp32 for half-precision inputs."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


# --------------------------------------------------------------------------------------------
# adaLN modulation of packed samples
# --------------------------------------------------------------------------------------------


class Segments:
    """Which packed sample each token belongs to, for per-sample (adaLN) vectors.

    ``expand(v [N, D]) -> [L, 1, D]`` repeats each sample's vector over its tokens; ``sum(t [L, 1, D])
    -> [N, D]`` adds each sample's tokens up (a one-hot matmul: no atomics, fp32 accumulation).
    A sample's tokens are contiguous and samples come in order (``ids`` is non-decreasing), as in a pack
    and in every sequence- or context-parallel share of one.
    """

    def __init__(self, ids: torch.Tensor, num_samples: int, equal: bool = False):
        self.ids = ids  # [L] int64
        self.num_samples = num_samples
        # [N + 1]: sample s holds tokens bounds[s]:bounds[s + 1] (empty when none of its tokens are here)
        self.bounds = torch.searchsorted(ids, torch.arange(num_samples + 1, device=ids.device))
        # True when the tokens are num_samples whole samples of one length (images of one size): the
        # per-sample vectors then broadcast over a [N, length, D] view, with no gather and no one-hot sums.
        # A bool, not the length: a compiled layer then keeps one graph for every such pack.
        self.equal = equal
        self._onehot: dict[torch.dtype, torch.Tensor] = {}  # [N, L] per dtype, made on first use (eager only)

    def expand(self, v: torch.Tensor) -> torch.Tensor:
        return v[self.ids].unsqueeze(1)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        onehot = self._onehot.get(t.dtype)
        if onehot is None:  # not F.one_hot: on CUDA it reads the ids' range back to the host to check it
            onehot = torch.zeros((self.num_samples, self.ids.numel()), dtype=t.dtype, device=t.device)
            onehot = self._onehot[t.dtype] = onehot.scatter_(0, self.ids.unsqueeze(0), 1.0)
        return onehot @ t.reshape(t.shape[0], -1)


class _Modulate(torch.autograd.Function):
    """``x * (1 + scale[sample]) + shift[sample]``, saving only ``x`` and the per-sample ``scale``."""

    @staticmethod
    def forward(ctx, x, shift, scale, seg: Segments):
        ctx.seg = seg
        one_plus_scale = 1 + scale  # [N, D]: cheaper before the expansion to tokens
        ctx.save_for_backward(x, one_plus_scale)
        return torch.addcmul(seg.expand(shift), x, seg.expand(one_plus_scale))

    @staticmethod
    def backward(ctx, grad):
        x, one_plus_scale = ctx.saved_tensors
        seg = ctx.seg
        return grad * seg.expand(one_plus_scale), seg.sum(grad), seg.sum(grad * x), None


class _GatedResidual(torch.autograd.Function):
    """``residual + gate[sample] * y``, saving only ``y`` and the per-sample ``gate``."""

    @staticmethod
    def forward(ctx, residual, y, gate, seg: Segments):
        ctx.seg = seg
        ctx.save_for_backward(y, gate)
        return torch.addcmul(residual, seg.expand(gate), y)

    @staticmethod
    def backward(ctx, grad):
        y, gate = ctx.saved_tensors
        seg = ctx.seg
        return grad, grad * seg.expand(gate), seg.sum(grad * y), None


def _by_sample(t: torch.Tensor, num_samples: int) -> torch.Tensor:
    return t.view(num_samples, -1, t.shape[-1])  # [L, 1, D] -> [N, length, D]


# N comes from the per-sample tensors' shapes, never from a Python int, so it stays symbolic under
# torch.compile; compiled code also gathers with plain indexing (inductor fuses the gather and writes the
# per-sample sums of the backward itself) where eager code uses the memory-lean autograd functions above.
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg: Segments) -> torch.Tensor:
    if seg.equal:
        return torch.addcmul(shift[:, None], _by_sample(x, shift.shape[0]), 1 + scale[:, None]).view(x.shape)
    if torch.compiler.is_compiling():
        return torch.addcmul(seg.expand(shift), x, seg.expand(1 + scale))
    return _Modulate.apply(x, shift, scale, seg)


def gated_residual(residual: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, seg: Segments) -> torch.Tensor:
    if seg.equal:
        n = gate.shape[0]
        return torch.addcmul(_by_sample(residual, n), gate[:, None], _by_sample(y, n)).view(residual.shape)
    if torch.compiler.is_compiling():
        return torch.addcmul(residual, seg.expand(gate), y)
    return _GatedResidual.apply(residual, y, gate, seg)


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg: Segments, eps: float,
                  fused: bool = False) -> torch.Tensor:
    """Parameter-free LayerNorm, then the sample's shift and scale (adaLN). ``fused``: one Triton kernel
    each way (:mod:`dfmkit.kernels.adaln`) where it runs."""
    if fused and kernels.adaln.available(x):
        return kernels.adaln.norm_modulate(x, shift, scale, seg, eps)
    return modulate(F.layer_norm(x, (x.shape[-1],), eps=eps), shift, scale, seg)


def residual_norm_modulate(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                           scale: torch.Tensor, seg: Segments, eps: float, fused: bool = False):
    """``(x + gate * h, norm_modulate(x + gate * h))``: the gated residual of one branch and the input of the next.
    ``h`` may cover only the first tokens of ``x`` (a branch skipped by the samples after them): zero for the rest."""
    kernel = fused and kernels.adaln.available(x)
    if not (kernel and not torch.is_grad_enabled()):  # only the kernel's forward without autograd takes fewer rows
        h = rows_of_zeros_after(h, x.shape[0])
    if kernel:
        return kernels.adaln.residual_norm_modulate(x, h, gate, shift, scale, seg, eps)
    x = gated_residual(x, h, gate, seg)
    return x, norm_modulate(x, shift, scale, seg, eps)


def rows_of_zeros_after(h: torch.Tensor, rows: int) -> torch.Tensor:
    """``h`` with rows of zeros after its own, up to ``rows``."""
    if h.shape[0] == rows:
        return h
    return torch.cat([h, h.new_zeros(rows - h.shape[0], *h.shape[1:])])


def add_norm_modulate(x: torch.Tensor, residual: tuple[torch.Tensor, torch.Tensor] | None, shift: torch.Tensor,
                      scale: torch.Tensor, seg: Segments, eps: float, fused: bool = False):
    """``x += gate * h`` for ``residual = (h, gate)`` when there is one, then the next branch's input
    ``norm_modulate(x)``: ``(x, input)``."""
    if residual is None:
        return x, norm_modulate(x, shift, scale, seg, eps, fused)
    return residual_norm_modulate(x, *residual, shift, scale, seg, eps, fused)


# --------------------------------------------------------------------------------------------
# Positions: 3D RoPE, 3D sin-cos
# --------------------------------------------------------------------------------------------


def rope3d_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head rotated by t, h and w: h and w get 2*(head_dim//6) each, t the rest (all even)."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope3d(pos: torch.Tensor, head_dim: int, theta: float,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each ``[L, 1, head_dim]`` in ``dtype``, of the rotation angles of every token's (t, h, w).

    Channel j and j + head_dim/2 form a rotated pair (rotate-half), so both halves carry the same angle.
    The angles are computed in float64 and rounded once; the rotation runs in the activations' dtype,
    as megatron's unfused RoPE does.
    """
    angles = []
    for axis, dim in enumerate(rope3d_axis_dims(head_dim)):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
        angles.append(pos[:, axis, None].double() * freqs)
    angle = torch.cat(angles, dim=-1)
    angle = torch.cat([angle, angle], dim=-1).unsqueeze(1)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [L, H, head_dim]``: ``x * cos + rotate_half(x) * sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat([-x2, x1], dim=-1), sin)


def _sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim // 2))
    angle = pos.double()[:, None] * omega
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def sincos3d(pos: torch.Tensor, hidden: int) -> torch.Tensor:
    """``[L, hidden]`` fixed 3D sin-cos embedding: hidden/4 channels for t, 3*hidden/8 each for h and w."""
    dt, dhw = hidden // 4, 3 * hidden // 8
    return torch.cat([_sincos_1d(pos[:, 0], dt), _sincos_1d(pos[:, 1], dhw), _sincos_1d(pos[:, 2], dhw)], -1).float()


# --------------------------------------------------------------------------------------------
# Conditioning: the timestep embedding and the adaLN projection
# --------------------------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    """The objective's ``c_noise`` (one per sample) -> sinusoid ``[sin | cos]`` of ``channels`` -> Linear, SiLU, Linear."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=c_noise.device) / half)
        angle = c_noise.float().reshape(-1, 1) * freqs
        emb = torch.cat([angle.sin(), angle.cos()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class AdaLN(nn.Module):
    """SiLU -> (low-rank) linear from the conditioning vector to ``n`` modulation vectors; last layer zero."""

    def __init__(self, hidden: int, n: int, lora_rank: int):
        super().__init__()
        if lora_rank > 0:
            self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, lora_rank, bias=False),
                                     nn.Linear(lora_rank, n * hidden, bias=False))
        else:
            self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, n * hidden))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.net(c)

    def from_silu(self, silu_c: torch.Tensor) -> torch.Tensor:
        """``forward(c)`` given ``SiLU(c)``, which the DiT computes once for all its layers."""
        return self.net[1:](silu_c)
