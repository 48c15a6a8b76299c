"""The DiT block, :class:`DiTLayer` (adaLN-Zero: self-attention, cross-attention to text, GELU MLP), and its
megatron ``ModuleSpec`` (:func:`dit_layer_spec`), from which megatron's ``TransformerBlock`` builds the layers.

A layer computes, with LN a parameter-free LayerNorm and mod(.) the sample's shift and scale::

    x += g1 * SA(mod(LN x))
    x += g2 * CA(mod(LN x), text)
    x += g3 * MLP(mod(LN x))

with one twist: a layer hands the next its residual stream WITHOUT the MLP's gated residual, plus the MLP output
and its gate, and the next layer (or the final layer) adds them in its first kernel, the gated residual + norm +
modulation of :mod:`dfmkit.kernels.adaln`. Adding them in a kernel of their own would write the stream once more
and read it back, and the backward would add the stream's two gradients in another pass: about 10 ms of an H100's
DiT-XL step at 128 x 256 tokens in six inductor kernels.

In sampling on a GPU (no autograd, half precision) the MLP's first matmul applies its GELU in cuBLASLt's epilogue
(:class:`DiTMLP`), to the fp32 accumulator: a separate GELU reads and writes the 4D-wide activation once more, 7% of
a guided DiT-XL evaluation of 16 images on an H100. cuBLASLt's GELU is the tanh form, within 5e-4 of the exact GELU
that training uses, where the bf16 rounding of the matmul's output, which the separate GELU reads, is up to 8e-3:
the fused output is closer to the exact one (tests/test_fused_kernels.py measures both).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import BaseTransformerLayer

from dfmkit.compat.megatron_linear import RowParallelLinear
from dfmkit.components.backbones.dit.attention import AttentionSubmodules, CrossAttention, SelfAttention
from dfmkit.components.backbones.dit.layers import AdaLN, RMSNorm, add_norm_modulate
from dfmkit.components.backbones.dit.layout import PackedLayout
from dfmkit.registry import Registry


class Modulation(NamedTuple):
    """One branch's per-sample adaLN vectors, each ``[N, D]``: its input is ``LN(x) * (1 + scale) + shift``,
    its output joins the stream as ``x += gate * branch``."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


@dataclasses.dataclass
class DiTLayerSubmodules:
    self_attention: Any = None
    cross_attention: Any = None
    mlp: Any = None


class DiTLayer(MegatronModule, BaseTransformerLayer):
    """adaLN-Zero block: x += g1 * SA(mod(LN x)); x += g2 * CA(mod(LN x), text); x += g3 * MLP(mod(LN x)).

    LN is parameter-free; the nine (shift, scale, gate) vectors per sample come from the conditioning vector
    ``c [N, D]``, which ``forward`` takes as ``SiLU(c)``, computed once for all layers. The last of the three
    residuals is left to the next layer (see the module docstring): ``forward`` takes the last layer's
    ``(MLP output, gate)`` as ``mlp_residual`` (None for the first layer) and returns ``(x, MLP output, gate)``,
    with ``x`` the stream before this layer's MLP residual.
    """

    def __init__(self, config: TransformerConfig, submodules: DiTLayerSubmodules, layer_number: int = 1,
                 pg_collection=None, vp_stage=None, adaln_lora_rank: int = 256, fused_kernels: bool = True, **_unused):
        super().__init__(config)
        self.layer_number = layer_number
        self.fused_kernels = fused_kernels
        tp_group = pg_collection.tp if pg_collection is not None else None
        self.eps = config.layernorm_epsilon
        self.adaln = AdaLN(config.hidden_size, 9, adaln_lora_rank)
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number,
                                           tp_group=tp_group)
        self.cross_attention = build_module(submodules.cross_attention, config=config, layer_number=layer_number,
                                            tp_group=tp_group)
        self.mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size,
                                tp_group=tp_group)
        self.sequence_parallel = config.sequence_parallel and config.tensor_model_parallel_size > 1

    def forward(self, x: torch.Tensor, silu_c: torch.Tensor, context: torch.Tensor, layout: PackedLayout,
                mlp_residual: tuple[torch.Tensor, torch.Tensor] | None = None):
        sa, ca, mlp = self.modulations(silu_c)  # each branch's per-sample (shift, scale, gate)
        # x += g3 * MLP(...) of the layer before (none before the first); m = mod(LN x) for self-attention
        x, m = self.residual_and_input(x, mlp_residual, sa, layout)
        # x += g1 * SA(m); m = mod(LN x) for cross-attention
        x, m = self.residual_and_input(x, (self.self_attention(m, layout), sa.gate), ca, layout)
        # x += g2 * CA(m, text); m = mod(LN x) for the MLP
        x, m = self.residual_and_input(x, (self.cross_attention(m, context, layout), ca.gate), mlp, layout)
        # x += g3 * MLP(m): left to the next layer's first kernel. The gate as a tensor of its own: a compiled
        # layer returning a view of its adaLN output would have torch.compile rebuild that view outside the graph
        # at every call, and its gradient in the backward.
        h, _ = self.mlp(m)
        return x, h, mlp.gate.contiguous()

    def modulations(self, silu_c: torch.Tensor) -> tuple[Modulation, Modulation, Modulation]:
        """The (shift, scale, gate) of self-attention, cross-attention and the MLP, from ``SiLU(c) [N, D]`` (one
        SiLU for all layers)."""
        mod = self.adaln.from_silu(silu_c)  # [N, 9D]
        if self.sequence_parallel:  # each TP rank holds part of every sample's tokens: sum their gradients
            mod = tensor_parallel.copy_to_tensor_model_parallel_region(mod)
        vectors = mod.chunk(9, dim=-1)
        return Modulation(*vectors[0:3]), Modulation(*vectors[3:6]), Modulation(*vectors[6:9])

    def residual_and_input(self, x: torch.Tensor, residual: tuple[torch.Tensor, torch.Tensor] | None,
                           next_branch: Modulation, layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """``x += gate * h`` for ``residual = (h, gate)`` (when given), then the next branch's input
        ``mod(LN x)``: ``(x, input)``, one kernel each way where the fused kernels run."""
        return add_norm_modulate(x, residual, next_branch.shift, next_branch.scale, layout.sp_samples, self.eps,
                                 self.fused_kernels)


class DiTMLP(MLP):
    """megatron's MLP (fc1, GELU, fc2). Without autograd on a GPU in half precision, outside sequence parallelism,
    fc1 and the GELU run as one cuBLASLt matmul (see the module docstring; ``fused_kernels`` False turns it off)."""

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, *args, fused_kernels: bool = True,
                 **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.fused_kernels = fused_kernels
        self.fused_gelu_ok = not (config.sequence_parallel and config.tensor_model_parallel_size > 1)
        # cuBLASLt's GELU epilogue comes with a bias; fc1 has none (not saved: not part of the model)
        self.register_buffer("zero_bias", torch.zeros(self.linear_fc1.weight.shape[0]), persistent=False)

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        if not (self.fused_kernels and self.fused_gelu_ok and per_token_scale is None and not torch.is_grad_enabled()
                and hidden_states.is_cuda and hidden_states.dtype in (torch.bfloat16, torch.float16)
                and self.linear_fc1.weight.dtype == hidden_states.dtype == self.zero_bias.dtype):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        tokens = hidden_states.shape[:-1]
        # x W1^T, then GELU (tanh form) on the fp32 accumulator, in one cuBLASLt call; this TP rank's columns
        intermediate = torch._addmm_activation(self.zero_bias, hidden_states.reshape(-1, hidden_states.shape[-1]),
                                               self.linear_fc1.weight.t(), use_gelu=True)
        return self.linear_fc2(intermediate.view(*tokens, -1))


def dit_layer_spec(attention: str = "torch", adaln_lora_rank: int = 256, text_dim: int = 1024,
                   fused_kernels: bool = True, *, attention_registry: Registry) -> ModuleSpec:
    """The DiT block on megatron-core's local (non-TE) parallel linears. ``attention`` names the packed attention
    backend in ``attention_registry`` (the job's ``registries.attention``); ``fused_kernels`` allows the Triton
    kernels of :mod:`dfmkit.kernels.adaln` and :mod:`dfmkit.kernels.qkv` where they run."""

    def attention_spec(module, **params):
        return ModuleSpec(
            module=module,
            params={"attention_backend": attention, "attention_registry": attention_registry,
                    "fused_kernels": fused_kernels, **params},
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
            mlp=ModuleSpec(module=DiTMLP, params={"fused_kernels": fused_kernels},
                           submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
        ),
    )
