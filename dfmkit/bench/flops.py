"""Model FLOPs of the DiT for one packed forward, training step FLOPs, and MFU. Pure arithmetic.

What is counted: the multiply-adds (MACs) of every matrix product of the model on the REAL tokens
of each sample (padding excluded: "model FLOPs", not hardware FLOPs); FLOPs = 2 x MACs. Norms,
softmax, RoPE, activations, modulation, gates, residuals and biases are not counted (together under
1% at these widths; LayerNorm alone is 0.06% of DiT-XL/2). A training step is 3 x forward (backward
= 2 x forward: the gradients with respect to the inputs and to the weights each cost one forward's
products).

A pack holds N samples, sample i with L_i latent tokens and K_i text tokens; L = sum L_i, D the
hidden size, H = round(mlp_ratio * D) the MLP width, F_in / F_out the token widths, D_text the text
width, n_mod = 9 modulation vectors per layer (6 without cross-attention). MACs of one forward:

    per layer   self-attention  QKV 3*L*D^2 + output L*D^2, scores and weighted sum 2*D*sum(L_i^2)
                                 (each sample attends only to itself: sum L_i^2, not (sum L_i)^2)
                cross-attention  q L*D^2 + output L*D^2, k/v 2*D_text*D*sum(K_i) (each sample's own
                                 text), scores and weighted sum 2*D*sum(L_i*K_i)
                MLP              2*L*D*H
                adaLN            once per SAMPLE: N*n_mod*D^2 (full), N*(D*r + r*n_mod*D) (rank r)
    once        patch embedding  L*F_in*D
                timestep MLP     per sample: N*(C_t*D + D^2), C_t = timestep_channels (sinusoid width)
                final layer      adaLN per sample N*2*D^2 (full rank, as in the backbone) + L*D*F_out

These are the products of ``dfmkit.components.backbones.dit``: its ``x_embedder`` (F_in -> D),
``TimestepEmbedding`` (C_t -> D -> D, no fps embedder), ``DiTLayer`` (adaLN to 9 vectors, low-rank
when ``adaln_lora_rank`` > 0; QKV and output; cross q, kv from ``text_dim``, output; fc1/fc2) and
``FinalLayer`` (full-rank adaLN to 2 vectors, linear to F_out = F_in). :meth:`DiTShape.from_options`
reads the backbone's options. On a pack without padding the count equals, to the FLOP, what
``torch.utils.flop_counter.FlopCounterMode`` measures on the backbone's forward (tested on the tiny
preset, full and low-rank adaLN).

The hand check: the DiT paper's class-conditional DiT-XL/2 at 256 tokens (32x32x4 latent, p=2, full
adaLN with 6 vectors, no cross-attention, F_in=16, F_out=32) counts 118,621,421,568 MACs here, the
paper's "118.6 Gflops" (which are MACs). That is exactly the sum of fvcore 0.1.5's linear, conv and
matmul entries on the reference model's structure: the paper counts every matrix product, the
attention matmuls included (4.23 G; without them 114.4 G) and the per-image adaLN (0.22 G). fvcore
also counts LayerNorm at 4 ops per element (+0.067 G, 118.69 G), which the paper's figure does not
carry. Same agreement for the paper's XL/4 (29.04 vs 29.05) and XL/2 at 512 px (524.54 vs 524.6).

What cross-attention and low-rank adaLN change, DiT-XL (28 x 1152), one sample of 77 text tokens,
forward GFLOPs (2 x MACs; dfmkit's default F_in = F_out = 64, timestep_channels 256):

    tokens  dfmkit XL (r=256,    without      cross-attention adds           full adaLN instead
            cross, D_text 1024)  cross-attn   D_text 1024 / D_text 4096      of rank 256 adds
     256       287.78              236.96     +50.82 (+21.4%) / +81.34 (+34.3%)    +0.50 (+0.17%)
    1024      1221.53             1048.94    +172.60 (+16.5%) / +203.12 (+19.4%)   +0.50 (+0.04%)

Over the 28 layers, cross-attention is q and output projections 38.1 / 152.2 GFLOPs (256 / 1024
tokens), k/v projections of the text 10.2 (D_text 1024) or 40.7 (4096) whatever the tokens, scores
and weighted sum 2.5 / 10.2, and 3 more adaLN vectors (0.05 at r=256). adaLN runs once per sample, so
its cost does not grow with tokens: 0.165 GFLOPs at r=256 vs 0.669 full rank (9*D^2 = 11.9 M MACs
per layer vs D*r + r*9*D = 2.95 M). Computed per token instead it would be 256x that at 256 tokens.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import attrs
from attrs import validators as v

# Dense bf16 tensor-core peak of one H100 / H200 SXM (no sparsity), FLOP/s.
H100_BF16_DENSE_PEAK = 989e12
DEFAULT_PEAK_FLOPS = H100_BF16_DENSE_PEAK

# Keys of :func:`forward_breakdown`, in the order of the forward.
BREAKDOWN_KEYS = (
    "patch_embed",
    "timestep_embed",
    "adaln",
    "self_attn_proj",
    "self_attn_core",
    "cross_attn_proj",
    "cross_attn_kv",
    "cross_attn_core",
    "mlp",
    "final_layer",
)


@attrs.frozen(kw_only=True)
class DiTShape:
    """The widths that decide a DiT's FLOPs (a plain description; no model is built).

    ``num_heads`` does not change the count (attention costs the same split into any number of heads);
    it is kept so the shape names the model. ``out_features`` of ``None`` means ``in_features`` (the
    EDM network predicts a tensor of the input's shape).
    """

    num_layers: int = attrs.field(validator=v.gt(0))
    hidden_size: int = attrs.field(validator=v.gt(0))
    num_heads: int = attrs.field(default=1, validator=v.gt(0))
    in_features: int = attrs.field(validator=v.gt(0))  # p * p * pt * C
    out_features: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    text_dim: int = attrs.field(default=1024, validator=v.gt(0))
    cross_attention: bool = True
    adaln_lora_rank: int = attrs.field(default=256, validator=v.ge(0))  # 0: full-rank adaLN
    mlp_ratio: float = attrs.field(default=4.0, validator=v.gt(0))
    timestep_channels: int = attrs.field(default=256, validator=v.gt(0))

    @property
    def mlp_hidden(self) -> int:
        return round(self.hidden_size * self.mlp_ratio)

    @property
    def num_modulations(self) -> int:
        """(shift, scale, gate) per sub-block: self-attention, cross-attention (if any), MLP."""
        return 9 if self.cross_attention else 6

    @property
    def output_features(self) -> int:
        return self.in_features if self.out_features is None else self.out_features

    @classmethod
    def from_options(cls, options: Any) -> DiTShape:
        """The shape of the ``dit`` backbone built from ``options`` (its ``DiTOptions``)."""
        num_layers, hidden_size, num_heads = options.resolved()  # the preset where a field is 0
        return cls(
            num_layers=num_layers,
            hidden_size=hidden_size,
            num_heads=num_heads,
            in_features=options.in_features,
            out_features=options.in_features,
            text_dim=options.text_dim,
            cross_attention=True,
            adaln_lora_rank=options.adaln_lora_rank,
            mlp_ratio=options.mlp_ratio,
            timestep_channels=options.timestep_channels,
        )

    @classmethod
    def preset(cls, name: str, **changes: Any) -> DiTShape:
        """dfmkit's default backbone at preset ``name`` (tiny, S, B, L, XL), with ``changes`` applied."""
        from dfmkit.components.backbones.options import DiTOptions  # attrs only; kept out of import time

        return attrs.evolve(cls.from_options(DiTOptions(preset=name)), **changes)


def _counts(values: Iterable[Any], what: str, minimum: int) -> list[int]:
    try:
        counts = [operator.index(x) for x in values]
    except TypeError as error:
        raise ValueError(f"{what} must be integers, one per sample ({error})") from None
    if not counts:
        raise ValueError(f"{what} is empty: a pack has at least one sample")
    if min(counts) < minimum:
        raise ValueError(f"{what} must each be >= {minimum}, got {counts}")
    return counts


def forward_breakdown(shape: DiTShape, token_counts: Iterable[int], text_counts: Iterable[int] | None = None) -> dict[str, int]:
    """FLOPs (2 x MACs) of one forward of a pack, by part (:data:`BREAKDOWN_KEYS`); the values sum to
    :func:`forward_flops`.

    ``token_counts``: real latent tokens of each sample (padding excluded); ``text_counts``: text tokens
    of each sample (required with cross-attention, ignored without). Any iterable of integers works,
    e.g. a packed batch's ``seqlens.tolist()`` and ``seqlens_kv.tolist()``.
    """
    lengths = _counts(token_counts, "token_counts", 1)
    n, tokens = len(lengths), sum(lengths)
    d, layers, mods, rank = shape.hidden_size, shape.num_layers, shape.num_modulations, shape.adaln_lora_rank
    macs = dict.fromkeys(BREAKDOWN_KEYS, 0)
    macs["patch_embed"] = tokens * shape.in_features * d
    macs["timestep_embed"] = n * (shape.timestep_channels * d + d * d)
    macs["adaln"] = layers * n * (d * rank + rank * mods * d if rank else mods * d * d)
    macs["self_attn_proj"] = layers * 4 * tokens * d * d
    macs["self_attn_core"] = layers * 2 * d * sum(x * x for x in lengths)
    if shape.cross_attention:
        if text_counts is None:
            raise ValueError("text_counts is required for a model with cross-attention (text tokens per sample)")
        texts = _counts(text_counts, "text_counts", 0)
        if len(texts) != n:
            raise ValueError(f"{len(texts)} text_counts for {n} token_counts: give one per sample")
        macs["cross_attn_proj"] = layers * 2 * tokens * d * d
        macs["cross_attn_kv"] = layers * 2 * shape.text_dim * d * sum(texts)
        macs["cross_attn_core"] = layers * 2 * d * sum(x * k for x, k in zip(lengths, texts))
    macs["mlp"] = layers * 2 * tokens * d * shape.mlp_hidden
    macs["final_layer"] = n * 2 * d * d + tokens * d * shape.output_features
    return {key: 2 * value for key, value in macs.items()}


def forward_flops(shape: DiTShape, token_counts: Iterable[int], text_counts: Iterable[int] | None = None) -> int:
    """Model FLOPs (2 x multiply-adds) of one forward of a pack; see :func:`forward_breakdown`."""
    return sum(forward_breakdown(shape, token_counts, text_counts).values())


def training_flops(shape: DiTShape, token_counts: Iterable[int], text_counts: Iterable[int] | None = None) -> int:
    """Model FLOPs of one training step on a pack: forward + backward = 3 x forward."""
    return 3 * forward_flops(shape, token_counts, text_counts)


def mfu(flops_per_s: float, peak: float = DEFAULT_PEAK_FLOPS, devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of ``devices`` devices (a fraction).

    ``peak`` is one device's dense peak (default: H100/H200 bf16, 989 TFLOP/s); ``flops_per_s`` is the
    model FLOPs of all ``devices`` together per second of wall time.
    """
    if not peak > 0 or not devices >= 1:
        raise ValueError(f"peak must be > 0 and devices >= 1, got peak={peak!r}, devices={devices!r}")
    return flops_per_s / (peak * devices)
