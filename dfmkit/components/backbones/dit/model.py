"""DiT: a text-conditioned Diffusion Transformer over packed latent tokens, on megatron-core.

Read top to bottom:

1. small pieces: per-head RMSNorm, adaLN modulation of packed samples, 3D RoPE / 3D sin-cos,
   the timestep embedding;
2. :class:`PackedLayout`: everything a forward needs to know about the pack (which sample each token
   belongs to, attention segments, which keys are real, positions), computed once per forward;
3. self- and cross-attention on megatron's column/row-parallel linears with a pluggable packed
   attention backend (:mod:`dfmkit.components.attention`);
4. :class:`DiTLayer` (adaLN-Zero block: self-attention -> cross-attention -> GELU MLP) and its
   megatron ModuleSpec; megatron's ``TransformerBlock`` holds the layers (numbering, checkpoint keys);
5. :class:`DiT` (patch embedding, timestep embedding, the layers in turn, final adaLN layer) and :func:`build`.

A layer hands the next its residual stream WITHOUT its MLP's gated residual, plus the MLP output and gate: the
next layer (or the final layer) adds them in its first kernel, the gated residual + norm + modulation of
:mod:`.adaln_kernels`. Adding them in a kernel of their own would write the stream once more and read it back,
and the backward would add the stream's two gradients in another pass: about 10 ms of an H100's DiT-XL step at
128 x 256 tokens in six inductor kernels.

The call: ``model(x [L, F], c_noise [N], batch) -> [L, F]``, the EDM network output F_theta for each
token (preconditioning happens outside). ``batch`` is a :class:`~dfmkit.batch.PackedBatch`, or under
context parallelism this rank's :class:`~dfmkit.parallel.ContextParallelBatch` with ``x`` its tokens.

Parallelism: tensor parallelism splits heads (q/k/v, fc1 column-parallel; output projections and fc2
row-parallel); every TP rank gets the same inputs and returns the same output. Sequence parallelism
scatters the tokens across TP ranks after the patch embedding and gathers them before the final
layer; because the adaLN modulation of a sample then only sees part of its tokens on each rank, its
gradient is all-reduced over the TP group inside the layer, so no parameter needs a sequence-parallel
gradient reduction. Context parallelism: see :mod:`dfmkit.parallel.context`; keys and values are
all-gathered over the CP group inside self-attention.

Gradient reductions left to the caller (megatron DDP + ``finalize_model_grads`` or
:func:`dfmkit.parallel.reduce_gradients`): average over DP, sum over CP, and sum over TP of the
per-head q/k RMSNorm weights (named ``q_layernorm``/``k_layernorm``; ``config.qk_layernorm`` is set
so megatron does it).

Text and classifier-free guidance: the key/value projections of cross-attention have NO bias, so text
states of zeros give keys and values of zeros and cross-attention outputs exactly zero, whatever the
text length. The guidance code relies on this: "null text" is zero states (see dfmkit.batch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import BaseTransformerLayer
from torch import nn

from dfmkit.batch import BatchError, PackedBatch
from dfmkit.components.attention.base import VarlenParams
from dfmkit.components.backbones.options import DiTOptions
from dfmkit.errors import DfmkitError
from dfmkit.kernels import adaln as adaln_kernels
from dfmkit.kernels import qkv as qkv_kernels
from dfmkit.parallel.context import ContextParallelBatch, shard_index

# ============================================================================================
# 1. Small pieces
# ============================================================================================


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim (per-head QK norm); PyTorch's fused
    ``rms_norm`` accumulates in fp32 for half-precision inputs."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


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
    each way (:mod:`.adaln_kernels`) where it runs."""
    if fused and adaln_kernels.available(x):
        return adaln_kernels.norm_modulate(x, shift, scale, seg, eps)
    return modulate(F.layer_norm(x, (x.shape[-1],), eps=eps), shift, scale, seg)


def residual_norm_modulate(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                           scale: torch.Tensor, seg: Segments, eps: float, fused: bool = False):
    """``(x + gate * h, norm_modulate(x + gate * h))``: the gated residual of one branch and the input of the next."""
    if fused and adaln_kernels.available(x):
        return adaln_kernels.residual_norm_modulate(x, h, gate, shift, scale, seg, eps)
    x = gated_residual(x, h, gate, seg)
    return x, norm_modulate(x, shift, scale, seg, eps)


def rope3d_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head rotated by t, h and w: h and w get 2*(head_dim//6) each, t the rest (all even)."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope3d(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
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


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm,
                 rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of queries and keys, then the rotary embedding when there is one."""
    q, k = q_norm(q), k_norm(k)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return q, k


def _sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim // 2))
    angle = pos.double()[:, None] * omega
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def sincos3d(pos: torch.Tensor, hidden: int) -> torch.Tensor:
    """``[L, hidden]`` fixed 3D sin-cos embedding: hidden/4 channels for t, 3*hidden/8 each for h and w."""
    dt, dhw = hidden // 4, 3 * hidden // 8
    return torch.cat([_sincos_1d(pos[:, 0], dt), _sincos_1d(pos[:, 1], dhw), _sincos_1d(pos[:, 2], dhw)], -1).float()


class TimestepEmbedding(nn.Module):
    """EDM's ``c_noise`` (one per sample) -> sinusoid ``[sin | cos]`` of ``channels`` -> Linear, SiLU, Linear."""

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
            self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, lora_rank, bias=False), nn.Linear(lora_rank, n * hidden, bias=False))
        else:
            self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, n * hidden))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.net(c)


# ============================================================================================
# 2. The packed layout of one forward
# ============================================================================================


class DiTInputError(BatchError):
    """Model inputs that disagree with each other, the model or the parallel layout."""


@dataclasses.dataclass
class PackedLayout:
    """What the layers need about the pack, computed once per forward."""

    samples: Segments  # tokens of this (CP) rank, full sequence
    sp_samples: Segments  # the tokens a layer holds: this TP rank's chunk under SP, else == samples
    self_attn: VarlenParams  # local query segments vs. each sample's real keys
    kv_index: torch.Tensor | None  # rows of the (CP-gathered) keys that are real, grouped by sample
    cross_attn: VarlenParams  # local query segments vs. each sample's text
    rope: tuple[torch.Tensor, torch.Tensor] | None
    cp_group: Any = None  # set when keys/values must be all-gathered over context parallelism


def _real_positions(cu: list[int], seqlens: list[int], device) -> torch.Tensor:
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(cu, seqlens)])


def build_layout(
    batch: PackedBatch,
    *,
    tp_size: int,
    tp_rank: int,
    sequence_parallel: bool,
    cp_group: Any,
    rope: tuple[int, float] | None,
    dtype: torch.dtype = torch.float32,
) -> PackedLayout:
    device = batch.latents.device
    n = batch.num_samples
    cu = batch.host("cu_seqlens")
    seqlens = batch.host("seqlens")
    padded = [b - a for a, b in zip(cu, cu[1:])]
    equal = n > 0 and all(length == padded[0] for length in padded)
    samples = Segments(batch.token_sample_ids(), n, equal=equal)
    sp_samples = samples
    if sequence_parallel and tp_size > 1:
        chunk = batch.num_tokens // tp_size
        sp_samples = Segments(samples.ids[tp_rank * chunk : (tp_rank + 1) * chunk], n)

    cu_k = [0]
    for length in seqlens:
        cu_k.append(cu_k[-1] + length)
    if isinstance(batch, ContextParallelBatch):
        global_cu = batch.host("global_cu_seqlens")
        gathered = torch.cat([shard_index(global_cu, batch.cp_size, r, device=device) for r in range(batch.cp_size)])
        row_of = torch.empty_like(gathered)
        row_of[gathered] = torch.arange(gathered.numel(), device=device)
        kv_index = row_of[_real_positions(global_cu, seqlens, device)]
    elif cu_k[-1] != batch.num_tokens:
        kv_index = _real_positions(cu, seqlens, device)
    else:
        kv_index = None

    rope_cs = None
    if rope is not None:
        head_dim, theta = rope
        rope_cs = rope3d(batch.pos_ids.to(device), head_dim, theta, dtype)
    return PackedLayout(
        samples=samples,
        sp_samples=sp_samples,
        self_attn=VarlenParams.from_host(cu, cu_k, device),
        kv_index=kv_index,
        cross_attn=VarlenParams.from_host(cu, batch.host("cu_seqlens_kv"), device),
        rope=rope_cs,
        cp_group=cp_group,
    )


# ============================================================================================
# 3. Attention
# ============================================================================================


@dataclasses.dataclass
class AttentionSubmodules:
    linear_q: Any = None  # self-attention: linear_qkv (fused, per-head [q, k, v]); cross: linear_q
    linear_kv: Any = None  # cross-attention only: from the text states, per-head [k, v]
    q_layernorm: Any = None
    k_layernorm: Any = None
    linear_proj: Any = None


def make_attention_backend(name: str, num_heads: int, head_dim: int, kind: str) -> nn.Module:
    from dfmkit.plugins import default_plugins

    return default_plugins().registries.attention.get(name).build(num_heads=num_heads, head_dim=head_dim, kind=kind)


class _Attention(MegatronModule):
    def __init__(self, config: TransformerConfig, submodules: AttentionSubmodules, *, attention_backend: str,
                 kind: str, text_dim: int = 0, fused_kernels: bool = True, layer_number: int = 1, tp_group=None,
                 **_unused):
        super().__init__(config)
        self.layer_number = layer_number
        self.fused_kernels = fused_kernels
        tp = config.tensor_model_parallel_size
        self.head_dim = config.kv_channels
        self.heads = config.num_attention_heads // tp  # heads on this TP rank
        hidden = config.hidden_size
        if kind == "self":
            self.linear_qkv = build_module(
                submodules.linear_q, hidden, 3 * hidden, config=config, init_method=config.init_method,
                gather_output=False, bias=False, skip_bias_add=False, is_expert=False,
                tp_comm_buffer_name="qkv", tp_group=tp_group,
            )
        else:
            self.linear_q = build_module(
                submodules.linear_q, hidden, hidden, config=config, init_method=config.init_method,
                gather_output=False, bias=False, skip_bias_add=False, is_expert=False,
                tp_comm_buffer_name="q", tp_group=tp_group,
            )
            # The text is replicated on every rank, never sequence-parallel, and needs no input gradient.
            # bias=False is load-bearing: zero text -> zero keys and values -> zero output (null text for CFG).
            self.linear_kv = build_module(
                submodules.linear_kv, text_dim, 2 * hidden,
                config=dataclasses.replace(config, sequence_parallel=False), init_method=config.init_method,
                gather_output=False, bias=False, skip_bias_add=False, is_expert=False,
                tp_comm_buffer_name="kv", tp_group=tp_group, disable_grad_reduce=True,
            )
        self.q_layernorm = build_module(submodules.q_layernorm, hidden_size=self.head_dim, eps=config.layernorm_epsilon)
        self.k_layernorm = build_module(submodules.k_layernorm, hidden_size=self.head_dim, eps=config.layernorm_epsilon)
        self.core = make_attention_backend(attention_backend, self.heads, self.head_dim, kind)
        self.linear_proj = build_module(
            submodules.linear_proj, hidden, hidden, config=config, init_method=config.output_layer_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="proj", tp_group=tp_group,
        )
        self.recompute_core = config.recompute_granularity == "selective" and "core_attn" in config.recompute_modules

    def attend(self, q, k, v, params: VarlenParams) -> torch.Tensor:
        if self.recompute_core and self.training:
            return tensor_parallel.checkpoint(lambda q_, k_, v_: self.core(q_, k_, v_, params), False, q, k, v)
        return self.core(q, k, v, params)

    def project(self, out: torch.Tensor) -> torch.Tensor:
        projected, _ = self.linear_proj(out.reshape(out.shape[0], 1, self.heads * self.head_dim))
        return projected


class SelfAttention(_Attention):
    """Packed self-attention: per-head RMSNorm on q and k, 3D RoPE (optional), no cross-sample attention."""

    def __init__(self, config, submodules, **kwargs):
        super().__init__(config, submodules, kind="self", **kwargs)

    def forward(self, hidden: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        qkv, _ = self.linear_qkv(hidden)  # [L, 1, 3 * heads * head_dim] (tokens gathered under SP)
        if self.fused_kernels and qkv_kernels.available(qkv):
            q, k, v = qkv_kernels.split_qkv(qkv, self.heads, self.q_layernorm.weight, self.k_layernorm.weight,
                                            self.q_layernorm.eps, layout.rope)
        else:
            q, k, v = qkv.view(qkv.shape[0], self.heads, 3 * self.head_dim).split(self.head_dim, dim=-1)
            q, k = qk_norm_rope(q, k, self.q_layernorm, self.k_layernorm, layout.rope)
        if layout.cp_group is not None:  # every CP rank needs all keys of its samples (backward: reduce-scatter)
            kv = tensor_parallel.gather_from_sequence_parallel_region(torch.cat([k, v], -1), True, group=layout.cp_group)
            k, v = kv.split(self.head_dim, dim=-1)
        if layout.kv_index is not None:  # padding never serves as a key
            k, v = k[layout.kv_index], v[layout.kv_index]
        return self.project(self.attend(q, k, v, layout.self_attn))


class CrossAttention(_Attention):
    """Packed cross-attention of each sample's latent tokens to its own text states."""

    def __init__(self, config, submodules, **kwargs):
        super().__init__(config, submodules, kind="cross", **kwargs)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        q, _ = self.linear_q(hidden)
        kv, _ = self.linear_kv(context)  # [Lkv, 1, 2 * heads * head_dim]
        if self.fused_kernels and qkv_kernels.available(q) and qkv_kernels.available(kv):
            q = qkv_kernels.norm_heads(q, self.heads, self.q_layernorm.weight, self.q_layernorm.eps)
            k, v = qkv_kernels.split_kv(kv, self.heads, self.k_layernorm.weight, self.k_layernorm.eps)
        else:
            q = self.q_layernorm(q.view(q.shape[0], self.heads, self.head_dim))
            k, v = kv.view(kv.shape[0], self.heads, 2 * self.head_dim).split(self.head_dim, dim=-1)
            k = self.k_layernorm(k)
        return self.project(self.attend(q, k, v, layout.cross_attn))


# ============================================================================================
# 4. The DiT block and its megatron spec
# ============================================================================================


@dataclasses.dataclass
class DiTLayerSubmodules:
    self_attention: Any = None
    cross_attention: Any = None
    mlp: Any = None


class DiTLayer(MegatronModule, BaseTransformerLayer):
    """adaLN-Zero block: x += g1 * SA(mod(LN x)); x += g2 * CA(mod(LN x), text); x += g3 * MLP(mod(LN x)).

    LN is parameter-free; the nine (shift, scale, gate) vectors per sample come from the conditioning vector
    ``c [N, D]``. The last of the three residuals is left to the next layer (see the module docstring):
    ``forward`` takes the last layer's ``(MLP output, gate)`` as ``mlp_residual`` (None for the first layer) and
    returns ``(x, MLP output, gate)``, with ``x`` the stream before this layer's MLP residual.
    """

    def __init__(self, config: TransformerConfig, submodules: DiTLayerSubmodules, layer_number: int = 1,
                 pg_collection=None, vp_stage=None, adaln_lora_rank: int = 256, fused_kernels: bool = True, **_unused):
        super().__init__(config)
        self.layer_number = layer_number
        self.fused_kernels = fused_kernels
        tp_group = pg_collection.tp if pg_collection is not None else None
        self.eps = config.layernorm_epsilon
        self.adaln = AdaLN(config.hidden_size, 9, adaln_lora_rank)
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number, tp_group=tp_group)
        self.cross_attention = build_module(submodules.cross_attention, config=config, layer_number=layer_number, tp_group=tp_group)
        self.mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size, tp_group=tp_group)
        self.sequence_parallel = config.sequence_parallel and config.tensor_model_parallel_size > 1

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor, layout: PackedLayout,
                mlp_residual: tuple[torch.Tensor, torch.Tensor] | None = None):
        mod = self.adaln(c)  # [N, 9D]
        if self.sequence_parallel:  # each TP rank holds part of every sample's tokens: sum their gradients
            mod = tensor_parallel.copy_to_tensor_model_parallel_region(mod)
        shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca, shift_mlp, scale_mlp, gate_mlp = mod.chunk(9, dim=-1)
        seg, eps, fused = layout.sp_samples, self.eps, self.fused_kernels

        if mlp_residual is None:
            m = norm_modulate(x, shift_sa, scale_sa, seg, eps, fused)
        else:
            x, m = residual_norm_modulate(x, *mlp_residual, shift_sa, scale_sa, seg, eps, fused)
        h = self.self_attention(m, layout)
        x, m = residual_norm_modulate(x, h, gate_sa, shift_ca, scale_ca, seg, eps, fused)
        h = self.cross_attention(m, context, layout)
        x, m = residual_norm_modulate(x, h, gate_ca, shift_mlp, scale_mlp, seg, eps, fused)
        h, _ = self.mlp(m)
        # the gate as a tensor of its own: a compiled layer returning a view of its adaLN output would have
        # torch.compile rebuild that view outside the graph at every call, and its gradient in the backward
        return x, h, gate_mlp.contiguous()


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron's RowParallelLinear, handing its own TP group to the matmul: megatron-core 0.16 passes
    ``tp_group=None`` there, which warns on every call and breaks a torch.compile graph in two."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def dit_layer_spec(attention: str = "torch", adaln_lora_rank: int = 256, text_dim: int = 1024,
                   fused_kernels: bool = True) -> ModuleSpec:
    """The DiT block on megatron-core's local (non-TE) parallel linears; ``attention`` names the kernel backend,
    ``fused_kernels`` allows the Triton kernels of :mod:`.adaln_kernels` and :mod:`.qkv_kernels` where they run."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    def attention_spec(module, **params):
        return ModuleSpec(
            module=module,
            params={"attention_backend": attention, "fused_kernels": fused_kernels, **params},
            submodules=AttentionSubmodules(
                linear_q=ColumnParallelLinear, linear_kv=ColumnParallelLinear,
                q_layernorm=RMSNorm, k_layernorm=RMSNorm, linear_proj=RowParallelLinear,
            ),
        )

    return ModuleSpec(
        module=DiTLayer,
        params={"adaln_lora_rank": adaln_lora_rank, "fused_kernels": fused_kernels},
        submodules=DiTLayerSubmodules(
            self_attention=attention_spec(SelfAttention),
            cross_attention=attention_spec(CrossAttention, text_dim=text_dim),
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
        ),
    )


# ============================================================================================
# 5. The model
# ============================================================================================


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> parameter-free LN -> zero-initialised linear to the patch features."""

    def __init__(self, hidden: int, out_features: int, eps: float, fused_kernels: bool = True):
        super().__init__()
        self.eps = eps
        self.fused_kernels = fused_kernels
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor, c: torch.Tensor, seg: Segments,
                mlp_residual: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``mlp_residual``: the last layer's (MLP output, gate), added to ``x`` first (see :class:`DiTLayer`)."""
        shift, scale = self.adaln(c).chunk(2, dim=-1)
        if mlp_residual is None:
            x = norm_modulate(x, shift, scale, seg, self.eps, self.fused_kernels)
        else:
            _, x = residual_norm_modulate(x, *mlp_residual, shift, scale, seg, self.eps, self.fused_kernels)
        return self.linear(x.squeeze(1))


class DiT(MegatronModule):
    """``forward(x [L, F], c_noise [N], batch) -> [L, F]``; see the module docstring."""

    def __init__(self, config: TransformerConfig, options: DiTOptions):
        super().__init__(config)
        self.options = options
        hidden = config.hidden_size
        self.in_features = options.in_features
        self.text_dim = options.text_dim
        self.tp_size = config.tensor_model_parallel_size
        self.cp_size = config.context_parallel_size
        self.sequence_parallel = config.sequence_parallel and self.tp_size > 1
        self.rope = (config.kv_channels, options.rope_theta) if options.position_embedding == "rope3d" else None

        self.x_embedder = nn.Linear(self.in_features, hidden)
        self.t_embedder = TimestepEmbedding(options.timestep_channels, hidden)
        spec = dit_layer_spec(options.attention, options.adaln_lora_rank, options.text_dim, options.fused_kernels)
        self.decoder = TransformerBlock(
            config, TransformerBlockSubmodules(layer_specs=[spec] * config.num_layers, layer_norm=None),
            post_layer_norm=False,
        )
        self.final_layer = FinalLayer(hidden, self.in_features, config.layernorm_epsilon, options.fused_kernels)
        self._init_weights(config.init_method_std)
        if options.compile:
            # One graph per layer call, shared by all layers: inductor fuses the norms, modulation, RoPE and
            # gated residuals around the matmuls and the attention kernel. forward() marks the pack sizes
            # dynamic, so packs of other sizes reuse the graph (equal-size and mixed packs get one each).
            # Tuning the block sizes of the fused elementwise and norm kernels (GPU only) costs about 15 s of
            # compilation and made the XL step 3-5% faster on an H100 (benchmarks/gpu_throughput.py).
            inductor = {"max_autotune_pointwise": True, "triton.cudagraphs": options.cuda_graphs}
            for layer in self.decoder.layers:
                layer.compile(options=inductor)

    @torch.no_grad()
    def _init_weights(self, std: float) -> None:
        """N(0, std) for the plain linears (megatron initialises its own); zero for the adaLN-Zero outputs."""
        plain = [self.x_embedder, *self.t_embedder.mlp, *self.final_layer.adaln, self.final_layer.linear]
        plain += [m for layer in self.decoder.layers for m in layer.adaln.net]
        for module in plain:
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
        for module in [layer.adaln.net[-1] for layer in self.decoder.layers] + [self.final_layer.adaln[-1], self.final_layer.linear]:
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()

    def check_inputs(self, x: torch.Tensor, c_noise: torch.Tensor, batch: PackedBatch) -> None:
        if self.cp_size > 1:
            if not isinstance(batch, ContextParallelBatch) or batch.cp_size != self.cp_size:
                raise DiTInputError(
                    f"under context parallelism {self.cp_size} the model takes this rank's shard: pass "
                    "dfmkit.parallel.split_for_context_parallel(batch) and its latents"
                )
        elif isinstance(batch, ContextParallelBatch):
            raise DiTInputError(f"a context-parallel shard (CP {batch.cp_size}) given to a model built without context parallelism")
        batch.validate()
        if x.ndim != 2 or x.shape != (batch.num_tokens, self.in_features):
            raise DiTInputError(
                f"x must be [{batch.num_tokens}, {self.in_features}] (the batch's tokens x p*p*pt*C), got {tuple(x.shape)}"
            )
        if c_noise.numel() != batch.num_samples:
            raise DiTInputError(f"c_noise has {c_noise.numel()} values for {batch.num_samples} samples (one per sample)")
        if batch.text.shape[-1] != self.text_dim:
            raise DiTInputError(f"text states have width {batch.text.shape[-1]}, the model was built with text_dim {self.text_dim}")
        if min(batch.host("seqlens_kv"), default=1) < 1:
            raise DiTInputError(
                f"every sample needs at least one text token (seqlens_kv {batch.host('seqlens_kv')}); "
                "null text is one token of zeros"
            )
        if self.sequence_parallel and batch.num_tokens % self.tp_size:
            raise DiTInputError(
                f"sequence parallelism over {self.tp_size} ranks needs a token count divisible by {self.tp_size}, got "
                f"{batch.num_tokens}; pad samples to dfmkit.parallel.required_pad_multiple(recipe.parallel)"
            )

    def layout(self, batch: PackedBatch) -> PackedLayout:
        return build_layout(
            batch,
            tp_size=self.tp_size,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            sequence_parallel=self.sequence_parallel,
            cp_group=parallel_state.get_context_parallel_group() if self.cp_size > 1 else None,
            rope=self.rope,
            dtype=self.x_embedder.weight.dtype,
        )

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        self.check_inputs(x, c_noise, batch)
        layout = self.layout(batch)
        dtype = self.x_embedder.weight.dtype
        # [sequence, batch=1, hidden] as megatron's layers want it
        h = self.x_embedder(x.to(dtype).unsqueeze(1))
        if self.rope is None:
            h = h + sincos3d(batch.pos_ids, h.shape[-1]).to(h.dtype).unsqueeze(1)
        c = self.t_embedder(c_noise)  # [N, D]
        if self.sequence_parallel:
            h = tensor_parallel.scatter_to_sequence_parallel_region(h)
        context = batch.text.to(dtype).unsqueeze(1)
        if self.options.compile:
            mark_pack_sizes_dynamic(h, c, context, layout)
        h, mlp_residual = self.run_layers(h, c, context, layout)
        if self.sequence_parallel:  # the final layer takes whole samples: add the last residual before the gather
            h = gated_residual(h, *mlp_residual, layout.sp_samples)
            h = tensor_parallel.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
            mlp_residual = None
        return self.final_layer(h, c, layout.samples, mlp_residual)

    def run_layers(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor, layout: PackedLayout):
        """The layers in turn: ``(x, (MLP output, gate))`` of the last one (see :class:`DiTLayer`). With full
        recomputation each layer's activations are recomputed in the backward from its inputs
        (``recompute_method`` uniform, one layer a chunk, as megatron's ``TransformerBlock`` would)."""
        recompute = self.config.recompute_granularity == "full" and self.training
        mlp_residual = None
        for layer in self.decoder.layers:
            if recompute:
                def run(x, c, context, *residual, layer=layer):
                    return layer(x, c, context, layout, residual or None)

                x, h, gate = tensor_parallel.checkpoint(run, False, x, c, context, *(mlp_residual or ()))
            else:
                x, h, gate = layer(x, c, context, layout, mlp_residual)
            mlp_residual = (h, gate)
        return x, mlp_residual


# ============================================================================================
# Building
# ============================================================================================


def mark_pack_sizes_dynamic(h: torch.Tensor, c: torch.Tensor, context: torch.Tensor, layout: PackedLayout) -> None:
    """Tell torch.compile up front that token, sample and text counts change from pack to pack, so the
    compiled layers start shape-generic instead of recompiling on the first packs of other sizes."""
    from torch._dynamo import maybe_mark_dynamic

    tensors = [h, c, context, layout.samples.ids, layout.sp_samples.ids, layout.kv_index, *(layout.rope or ()),
               layout.samples.bounds, layout.sp_samples.bounds]
    for params in (layout.self_attn, layout.cross_attn):
        tensors += [params.cu_seqlens_q, params.cu_seqlens_k]
    for tensor in tensors:
        if tensor is not None and tensor.shape[0] > 1:  # sizes 0 and 1 are always specialised
            maybe_mark_dynamic(tensor, 0)


class DiTConfigError(DfmkitError):
    """DiT options that do not fit the parallel layout."""


def transformer_config(options: DiTOptions, *, tensor: int = 1, context: int = 1, sequence: bool = False,
                       use_cpu_initialization: bool = True) -> TransformerConfig:
    layers, hidden, heads = options.resolved()
    if heads % tensor:
        raise DiTConfigError(f"num_heads {heads} is not divisible by tensor parallelism {tensor}")
    recompute = {}
    if options.recompute == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    elif options.recompute == "selective":
        recompute = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return TransformerConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        kv_channels=hidden // heads,
        ffn_hidden_size=round(hidden * options.mlp_ratio),
        add_bias_linear=False,
        gated_linear_unit=False,
        activation_func=F.gelu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=options.layernorm_epsilon,
        init_method_std=options.init_std,
        qk_layernorm=True,
        # The training loss of a rank is a SUM over its tokens (or samples), normalised once by the global
        # count in finalize_model_grads: gradients must be summed over data and context parallel ranks, not
        # averaged (averaging scaled every gradient, and the logged gradient norm, by 1 / (DP x CP)).
        calculate_per_token_loss=True,
        tensor_model_parallel_size=tensor,
        context_parallel_size=context,
        sequence_parallel=sequence and tensor > 1,
        use_cpu_initialization=use_cpu_initialization,
        params_dtype=torch.float32,
        **recompute,
    )


def build(options: DiTOptions, *, recipe=None, parallel=None, device: str | torch.device | None = None, **_context) -> DiT:
    """The DiT for ``options`` under ``recipe.parallel`` (or ``parallel``; default: megatron's current groups).

    megatron's parallel_state must be set up by the caller (:func:`dfmkit.parallel.initialize`) when
    tensor or context parallelism is above 1. With neither above 1 and nothing set up, a one-process
    world is created (:func:`dfmkit.parallel.ensure_initialized`). Weights are fp32 (the training loop
    casts). The model is built on the current CUDA device when there is a GPU, else on the CPU (where
    ``use_cpu_initialization`` is forced on); ``device="meta"`` builds without memory (parameter counts).
    With ``use_cpu_initialization`` every weight matrix is drawn whole and then sliced, so the same seed
    gives the same model for every tensor-parallel size.
    """
    from dfmkit.parallel.state import ensure_initialized

    if parallel is None and recipe is not None:
        parallel = recipe.parallel
    current = ensure_initialized(parallel)
    sequence = bool(parallel.sequence) if parallel is not None else current.sequence_parallel
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    cpu_init = options.use_cpu_initialization or device.type != "cuda"
    config = transformer_config(options, tensor=current.tp_size, context=current.cp_size, sequence=sequence,
                                use_cpu_initialization=cpu_init)
    with torch.device(device):
        return DiT(config, options)


__all__ = ["DiT", "DiTLayer", "PackedLayout", "build", "dit_layer_spec", "transformer_config"]
