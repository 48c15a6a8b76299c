"""Packed attention through TransformerEngine's ``DotProductAttention`` in the "thd" format.

Registered as ``te`` only when ``transformer_engine`` imports (it needs CUDA). The DiT gathers
keys/values across context-parallel ranks itself and gives every backend the same local problem,
so TE runs without its own CP group here. ``num_heads`` is the number of heads on this
tensor-parallel rank (TE is told ``tp_size=1`` so it does not divide them again).
"""

from __future__ import annotations

import torch

from dfmkit.components.attention.base import VarlenParams


class TEPackedAttention(torch.nn.Module):
    def __init__(self, num_heads: int, head_dim: int, kind: str = "self"):
        super().__init__()
        import transformer_engine.pytorch as te

        self.core = te.DotProductAttention(
            num_attention_heads=num_heads,
            kv_channels=head_dim,
            attention_dropout=0.0,
            qkv_format="thd",
            attn_mask_type="padding",
            attention_type="self" if kind == "self" else "cross",
            tp_size=1,
        )

    def forward(self, q, k, v, params: VarlenParams):
        out = self.core(
            q,
            k,
            v,
            cu_seqlens_q=params.cu_seqlens_q,
            cu_seqlens_kv=params.cu_seqlens_k,
            max_seqlen_q=params.max_seqlen_q,
            max_seqlen_kv=params.max_seqlen_k,
        )
        return out.view(q.shape)


def build(options, *, num_heads: int, head_dim: int, kind: str = "self", **_context) -> torch.nn.Module:
    return TEPackedAttention(num_heads, head_dim, kind)
