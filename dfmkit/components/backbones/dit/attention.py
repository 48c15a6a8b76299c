"""The DiT's self- and cross-attention over packed samples, on megatron's column/row-parallel linears.

Each module projects, normalises and splits the heads itself and hands a packed attention backend the
local problem (:mod:`dfmkit.components.attention.base`): ``attend(q, k, v, params)`` where each sample's queries
see only its own keys. The backend is built from the attention registry of the job's plugins (the model's
``attention_registry``), by the name the recipe gives (``model.attention``).

- :class:`SelfAttention`: fused qkv projection, per-head RMSNorm on q and k, 3D RoPE (optional); padding tokens
  never serve as keys; under context parallelism keys and values are all-gathered over the CP group here.
- :class:`CrossAttention`: each sample's latent tokens attend to its own text states. The key/value projection
  has NO bias, so text states of zeros give keys and values of zeros and an output of exactly zero, whatever the
  text length: the guidance code relies on this, "null text" is zero states (see :mod:`dfmkit.batch`).

With ``fused_kernels`` the norms, rotation and head split run as the Triton kernels of :mod:`dfmkit.kernels.qkv`
where those take the input (CUDA, half precision); the torch code here is their reference everywhere else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from dfmkit import kernels
from dfmkit.components.attention.base import VarlenParams
from dfmkit.components.backbones.dit.layers import RMSNorm, apply_rope
from dfmkit.components.backbones.dit.layout import PackedLayout
from dfmkit.compat.torch_tensor import version
from dfmkit.registry import Registry


@dataclasses.dataclass
class AttentionSubmodules:
    linear_q: Any = None  # self-attention: linear_qkv (fused, per-head [q, k, v]); cross: linear_q
    linear_kv: Any = None  # cross-attention only: from the text states, per-head [k, v]
    q_layernorm: Any = None
    k_layernorm: Any = None
    linear_proj: Any = None


def make_attention_backend(registry: Registry, name: str, num_heads: int, head_dim: int, kind: str) -> nn.Module:
    """The packed attention backend ``name`` of ``registry`` (the job's ``registries.attention``)."""
    return registry.get(name).build(num_heads=num_heads, head_dim=head_dim, kind=kind)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm,
                 rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of queries and keys, then the rotary embedding when there is one."""
    q, k = q_norm(q), k_norm(k)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return q, k


class _Attention(MegatronModule):
    def __init__(self, config: TransformerConfig, submodules: AttentionSubmodules, *, attention_backend: str,
                 attention_registry: Registry, kind: str, text_dim: int = 0, fused_kernels: bool = True,
                 layer_number: int = 1, tp_group=None, **_unused):
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
        self.core = make_attention_backend(attention_registry, attention_backend, self.heads, self.head_dim, kind)
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
        if self.fused_kernels and kernels.qkv.available(qkv):
            q, k, v = kernels.qkv.split_qkv(qkv, self.heads, self.q_layernorm.weight, self.k_layernorm.weight,
                                            self.q_layernorm.eps, layout.rope)
        else:
            q, k, v = qkv.view(qkv.shape[0], self.heads, 3 * self.head_dim).split(self.head_dim, dim=-1)
            q, k = qk_norm_rope(q, k, self.q_layernorm, self.k_layernorm, layout.rope)
        if layout.cp_group is not None:  # every CP rank needs all keys of its samples (backward: reduce-scatter)
            kv = tensor_parallel.gather_from_sequence_parallel_region(torch.cat([k, v], -1), True,
                                                                      group=layout.cp_group)
            k, v = kv.split(self.head_dim, dim=-1)
        if layout.kv_index is not None:  # padding never serves as a key
            k, v = k[layout.kv_index], v[layout.kv_index]
        return self.project(self.attend(q, k, v, layout.self_attn))


class CrossAttention(_Attention):
    """Packed cross-attention of each sample's latent tokens to its own text states."""

    def __init__(self, config, submodules, **kwargs):
        super().__init__(config, submodules, kind="cross", **kwargs)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """The output of the first ``layout.text_tokens`` tokens when set: the rest are null-text samples', zero."""
        if layout.text_tokens is not None:
            tokens, _ = layout.text_tokens
            hidden = hidden[:tokens]
            if tokens == 0:
                return hidden.new_zeros(0, *hidden.shape[1:])
        q, _ = self.linear_q(hidden)
        if self.fused_kernels and kernels.qkv.available(q):
            q = kernels.qkv.norm_heads(q, self.heads, self.q_layernorm.weight, self.q_layernorm.eps)
        else:
            q = self.q_layernorm(q.view(q.shape[0], self.heads, self.head_dim))
        k, v = self.text_keys_values(context, layout)
        return self.project(self.attend(q, k, v, layout.cross_attn))

    def text_keys_values(self, context: torch.Tensor, layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[rows, heads, head_dim]`` of the text rows that cross-attention reads.

        They depend on the text and the weights only. Without autograd (sampling, validation) they are kept on the
        pack's layout and reused by later forwards of the pack while the text and the weights are the same tensors,
        unchanged in place (their version counters; text or weights made under ``torch.inference_mode`` have none,
        and are projected at every forward). Otherwise they are computed again, into the kept tensors when
        the shapes match: a CUDA graph captured from an earlier forward reads those, and does not compute them.
        After the text or the weights change, a graph replays stale keys until an eager forward or
        :meth:`dfmkit.components.backbones.dit.DiT.refresh_text` computes them again.
        """
        if layout.text_tokens is not None:
            context = context[: layout.text_tokens[1]]
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._keys_values(context)
        sources = (context, *self.linear_kv.parameters(), *self.k_layernorm.parameters())
        if any(version(t) is None for t in sources):  # inference tensors: a change in place would go unseen
            return self._keys_values(context)
        kept = layout.text_keys_values.get(id(self))
        if kept is not None and _unchanged(kept[0], sources):
            return kept[1]
        k, v = self._keys_values(context)
        # Into the kept tensors where they can be written: not those made under inference mode, outside it.
        writable = kept is not None and (torch.is_inference_mode_enabled() or not kept[1][0].is_inference())
        if writable and kept[1][0].shape == k.shape and kept[1][1].shape == v.shape:
            kept[1][0].copy_(k)
            kept[1][1].copy_(v)
            k, v = kept[1]
        # The stamp holds the sources (detached: same storage and version counter), so no other tensor can take
        # their addresses over while it is kept.
        layout.text_keys_values[id(self)] = (tuple((t.detach(), version(t)) for t in sources), (k, v))
        return k, v

    def _keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv, _ = self.linear_kv(context)  # [Lkv, 1, 2 * heads * head_dim]
        if self.fused_kernels and kernels.qkv.available(kv):
            return kernels.qkv.split_kv(kv, self.heads, self.k_layernorm.weight, self.k_layernorm.eps)
        k, v = kv.view(kv.shape[0], self.heads, 2 * self.head_dim).split(self.head_dim, dim=-1)
        return self.k_layernorm(k), v


def _unchanged(stamp: tuple[tuple[torch.Tensor, int], ...], sources: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``sources`` are the tensors of ``stamp`` (same storage, shape and strides), unchanged in place."""
    return len(stamp) == len(sources) and all(
        kept.data_ptr() == t.data_ptr() and kept.shape == t.shape and kept.stride() == t.stride()
        and kept_version == version(t) for (kept, kept_version), t in zip(stamp, sources))
