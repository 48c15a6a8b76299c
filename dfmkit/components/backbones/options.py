"""Options of the ``dit`` backbone (the recipe's ``[model]`` section). Light: attrs only, no torch.

Fields marked ``COMPUTATION_ONLY`` (attention, recompute, compile, fused_kernels, cuda_graphs,
use_cpu_initialization) change how the model is computed (or first initialised), not what it is: a run may
resume a checkpoint with other values of them (see :mod:`dfmkit.hookspecs`).

Presets; ``num_layers``, ``hidden_size`` and ``num_heads`` override the preset when non-zero.
Parameters as built with the default options (in_channels 16, patch 2x2x1, text_dim 1024,
adaLN-LoRA rank 256), counted by tests/test_backbone.py::test_preset_parameter_counts:

    preset  layers  hidden  heads  head_dim  parameters   of which in the blocks
    tiny       2      64      4      16            -       (tests only)
    S         12     384      6      64     46,601,152     46,009,344
    B         12     768     12      64    143,629,120    141,560,832
    L         24    1024     16      64    469,118,016    465,573,888
    XL        28    1152     16      72    673,297,984    668,868,480

Per block: 14*D^2 (self-attention 4, cross q/out 2, MLP 8) + 2*text_dim*D (cross k/v) +
D*r + r*9*D (adaLN-LoRA) + 4*head_dim (q/k norms). Full-rank adaLN (rank 0) makes XL 925,443,136;
text_dim 4096 (T5-XXL) makes it 871,478,848. The reference README's "DiT-S 330M / L 450M / XL 700M"
do not match its own modules either (its S is about 46.5M).
"""

from __future__ import annotations

from typing import Any

import attrs
from attrs import validators as v

from dfmkit.hookspecs import COMPUTATION_ONLY

PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

POSITION_EMBEDDINGS = ("rope3d", "sincos3d")
RECOMPUTE = ("none", "full", "selective")


@attrs.define(kw_only=True)
class DiTOptions:
    """DiT (adaLN-Zero blocks with self-attention, cross-attention to text, GELU MLP) on megatron-core.

    position_embedding: "rope3d" (default) rotates q and k in self-attention by each token's (t, h, w)
    patch coordinates: relative, defined for any grid size, and the same code path for images and videos
    packed together. "sincos3d" adds a fixed 3D sin-cos embedding (D/4 channels for t, 3D/8 each for h
    and w) computed from the coordinates on the fly, so it too works for any grid size (the reference
    looks it up in a fixed 34x40x40 table and aliases larger grids).

    layernorm_epsilon: 1e-6 here; the reference's effective value is 1e-5 (its provider's 1e-6 is an
    unannotated dataclass attribute that TransformerConfig's default overrides).
    """

    preset: str = attrs.field(default="XL", validator=v.in_(list(PRESETS)))
    num_layers: int = attrs.field(default=0, validator=v.ge(0))  # 0: from the preset
    hidden_size: int = attrs.field(default=0, validator=v.ge(0))
    num_heads: int = attrs.field(default=0, validator=v.ge(0))
    in_channels: int = attrs.field(default=16, validator=v.gt(0))  # latent channels C
    patch_spatial: int = attrs.field(default=2, validator=v.gt(0))  # p
    patch_temporal: int = attrs.field(default=1, validator=v.gt(0))  # pt
    text_dim: int = attrs.field(default=1024, validator=v.gt(0))  # 1024: T5-11B / T5-large; 4096: T5-XXL
    adaln_lora_rank: int = attrs.field(default=256, validator=v.ge(0))  # 0: full-rank adaLN
    mlp_ratio: float = attrs.field(default=4.0, validator=v.gt(0))
    position_embedding: str = attrs.field(default="rope3d", validator=v.in_(POSITION_EMBEDDINGS))
    rope_theta: float = attrs.field(default=10000.0, validator=v.gt(0))
    timestep_channels: int = attrs.field(default=256, validator=v.gt(0))  # sinusoid width before the MLP
    # a registered attention backend: torch, torch-sdpa, torch-varlen, torch-cudnn, torch-flex, te
    attention: str = attrs.field(default="torch", metadata={COMPUTATION_ONLY: True})
    layernorm_epsilon: float = attrs.field(default=1e-6, validator=v.gt(0))
    init_std: float = attrs.field(default=0.02, validator=v.gt(0))
    recompute: str = attrs.field(default="none", validator=v.in_(RECOMPUTE), metadata={COMPUTATION_ONLY: True})
    # torch.compile each DiT layer: inductor fuses the elementwise work around the matmuls and attention
    # (norms, adaLN modulation, RoPE, gated residuals). Faster on GPU (1.3-1.4x for DiT-XL on an H100); meant
    # for GPUs: on the CPU the per-sample attention loop of mixed-size packs recompiles for each new pack.
    compile: bool = attrs.field(default=False, metadata={COMPUTATION_ONLY: True})
    # Triton kernels on CUDA in bf16/fp16 for the adaLN chain (gated residual + LayerNorm + modulation) and for
    # the attentions' q/k RMSNorm (+ RoPE in self-attention) (dfmkit/kernels/adaln.py, qkv.py), eager or
    # compiled. Off: the torch code, which inductor fuses when compiled. No effect elsewhere (CPU, fp32), where
    # the torch code runs.
    fused_kernels: bool = attrs.field(default=True, metadata={COMPUTATION_ONLY: True})
    # With compile: each compiled layer's kernels replay as CUDA graphs (inductor's CUDA graph trees), one launch
    # for about a hundred. For steps the host holds up: small models, and packs of few long samples (DiT-XL on
    # 15 x 1024 tokens). A pack of a new shape records new graphs, which keep their own memory: meant for packs
    # of one shape (a fixed seq_length, images of one size). No effect without a GPU.
    cuda_graphs: bool = attrs.field(default=False, metadata={COMPUTATION_ONLY: True})
    # always on without a GPU; identical weights for every TP size
    use_cpu_initialization: bool = attrs.field(default=False, metadata={COMPUTATION_ONLY: True})

    def __attrs_post_init__(self) -> None:
        layers, hidden, heads = self.resolved()
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}")
        head_dim = hidden // heads
        if self.position_embedding == "rope3d" and (head_dim % 2 or head_dim < 6):
            raise ValueError(
                f"position_embedding 'rope3d' needs an even head dimension of at least 6 "
                f"(hidden_size {hidden} / num_heads {heads} = {head_dim})"
            )
        if self.position_embedding == "sincos3d" and hidden % 16:
            raise ValueError(f"position_embedding 'sincos3d' needs hidden_size divisible by 16, got {hidden}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs replays the compiled layers: set compile = true as well")
        if self.timestep_channels % 2:
            raise ValueError(f"timestep_channels must be even, got {self.timestep_channels}")
        if round(hidden * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} gives an empty MLP for hidden_size {hidden}")

    def recipe_problems(self, recipe: Any, registries: Any) -> list[str]:
        """Mistakes only the registries show: an attention backend that is not registered here."""
        if self.attention not in registries.attention:
            return [f"attention: {registries.attention.unknown_message(self.attention)}"]
        return []

    def resolved(self) -> tuple[int, int, int]:
        """(num_layers, hidden_size, num_heads) after applying the preset."""
        layers, hidden, heads = PRESETS[self.preset]
        return (self.num_layers or layers, self.hidden_size or hidden, self.num_heads or heads)

    def parameter_count(self) -> int:
        """The parameters of the DiT these options build (tests/test_backbone.py checks it against built models)."""
        layers, d, heads = self.resolved()
        head_dim, mlp, rank, features = d // heads, round(d * self.mlp_ratio), self.adaln_lora_rank, self.in_features
        adaln = d * rank + rank * 9 * d if rank > 0 else d * 9 * d + 9 * d
        self_attention = 3 * d * d + 2 * head_dim + d * d  # qkv, the q and k norms, the projection
        cross_attention = d * d + self.text_dim * 2 * d + 2 * head_dim + d * d  # q, kv from the text, norms, projection
        layer = adaln + self_attention + cross_attention + 2 * d * mlp
        embeddings = features * d + d + self.timestep_channels * d + d + d * d + d  # patches, timestep MLP
        final = d * 2 * d + 2 * d + d * features + features  # its adaLN and linear
        return layers * layer + embeddings + final

    @property
    def in_features(self) -> int:
        """Width of a patchified latent token: p * p * pt * C."""
        return self.patch_spatial * self.patch_spatial * self.patch_temporal * self.in_channels
