"""The least time a DiT training step can take when its matrix products and attention run in library kernels
(cuBLAS, cuDNN) and everything else moves only the bytes it must at copy bandwidth. Pure arithmetic;
benchmarks/step_floor.py times the products and the attention on a GPU and adds the parts up.

The step is split where a library call begins or ends. A matrix product or an attention call takes what the
library takes for it alone. Every chain of other work between two library calls is counted as ONE kernel that
reads each of its inputs once and writes each of its outputs once, at the copy bandwidth of the device. No such
code is faster, so the sum is a floor: a real step also has launch gaps, kernels below copy bandwidth and chains
split into several kernels.

Bytes per layer, in units of E = tokens x hidden x 2 (one bf16 activation) and E_t = text tokens x hidden x 2.
The layer's MLP gated residual is fused into the next layer's first norm (and the last layer's into the final
layer's), so it has no row of its own:

    forward                                            E     backward                                        E
    gated residual (MLP of the layer before) + LN +   4     its transpose: read grad x, grad m, x, h;       6
      modulate: read x, h; write x, m                         write grad x, grad h
    q/k RMSNorm + RoPE + split: read qkv, write q k v  6     read grad q k v, q and k unnormed; write grad qkv  8
    gated residual + LN + modulate (self -> cross)     4     as the first row                               6
    cross-attention q RMSNorm                          2     read grad, q; write grad                        3
    gated residual + LN + modulate (cross -> MLP)      4     as the first row                               6
    GELU: read and write r E (r = MLP width / hidden)  2r    read grad and the pre-activation, write grad   3r
    text keys' RMSNorm + split of kv                 4 E_t   read grad k v, k unnormed; write grad kv    5 E_t

That is (20 + 2r) E + 4 E_t forward and (29 + 3r) E + 5 E_t backward: 69 E + 9 E_t a layer for r = 4. The final
layer's norm + modulate adds 2 E forward and 3 E backward.

Per parameter, the optimizer side: the gradient norm reads the fp32 gradient (4 bytes); AdamW reads weight,
gradient and both moments and writes weight and moments, all fp32 (28), and writes the bf16 copy the model uses
(2); the EMA reads the bf16 weight and reads and writes its fp32 average (10). 44 bytes. Accumulating the
weight gradients moves nothing more: the products that make them write their fp32 sums themselves (cuBLAS
products with fp32 output, timed so), and the first of a step overwrites instead of adding to zeros.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from dfmkit.bench.flops import DiTShape

# Bytes a parameter's optimizer step must move at the least (see the module docstring).
OPTIMIZER_BYTES_PER_PARAMETER = 4 + 28 + 2 + 10


@attrs.frozen
class Linear:
    """A linear map of the step: ``rows`` vectors of width ``inputs`` to width ``outputs``, ``count`` times a step.
    ``input_gradient`` is False where nothing needs the gradient of its input (the latents, the text, the
    timestep's sinusoid)."""

    name: str
    inputs: int
    outputs: int
    rows: int
    count: int = 1
    input_gradient: bool = True

    def products(self) -> list[tuple[str, int, int, int]]:
        """``(kind, m, k, n)`` of each matrix product ``[m, k] @ [k, n]`` the step runs for it (once)."""
        kinds = [("forward", self.rows, self.inputs, self.outputs)]
        if self.input_gradient:
            kinds.append(("input gradient", self.rows, self.outputs, self.inputs))
        kinds.append(("weight gradient", self.outputs, self.rows, self.inputs))
        return kinds


def linears(shape: DiTShape, token_counts: Iterable[int], text_counts: Iterable[int]) -> list[Linear]:
    """The linear maps of one training step of the DiT on a pack (``dfmkit.components.backbones.dit``): per layer
    (``count`` = layers) and once. Their forward products are the FLOPs of :func:`dfmkit.bench.flops.forward_flops`
    less attention's scores and weighted sums."""
    lengths, texts = list(token_counts), list(text_counts)
    tokens, text_tokens, samples = sum(lengths), sum(texts), len(lengths)
    d, layers, rank = shape.hidden_size, shape.num_layers, shape.adaln_lora_rank
    mods = shape.num_modulations * d
    per_layer = [
        Linear("self-attention qkv", d, 3 * d, tokens),
        Linear("self-attention output", d, d, tokens),
        Linear("MLP fc1", d, shape.mlp_hidden, tokens),
        Linear("MLP fc2", shape.mlp_hidden, d, tokens),
    ]
    if shape.cross_attention:
        per_layer += [
            Linear("cross-attention q", d, d, tokens),
            Linear("cross-attention kv", shape.text_dim, 2 * d, text_tokens, input_gradient=False),
            Linear("cross-attention output", d, d, tokens),
        ]
    if rank:
        per_layer += [Linear("adaLN down", d, rank, samples), Linear("adaLN up", rank, mods, samples)]
    else:
        per_layer.append(Linear("adaLN", d, mods, samples))
    once = [
        Linear("patch embedding", shape.in_features, d, tokens, input_gradient=False),
        Linear("timestep MLP in", shape.timestep_channels, d, samples, input_gradient=False),
        Linear("timestep MLP out", d, d, samples),
        Linear("final adaLN", d, 2 * d, samples),
        Linear("final linear", d, shape.output_features, tokens),
    ]
    return [attrs.evolve(linear, count=layers) for linear in per_layer] + once


def bandwidth_bytes(shape: DiTShape, tokens: int, text_tokens: int) -> dict[str, int]:
    """Bytes the step's work outside matrix products and attention must move, by part (module docstring's table)."""
    e, e_text = tokens * shape.hidden_size * 2, text_tokens * shape.hidden_size * 2
    r = shape.mlp_hidden / shape.hidden_size
    chains = 3 if shape.cross_attention else 2  # gated residual + LN + modulate: 4 E forward, 6 E backward
    qk = 14 * e + ((5 * e + 9 * e_text) if shape.cross_attention else 0)
    return {
        "adaLN chains (norms, modulation, gated residuals)": shape.num_layers * chains * 10 * e + 5 * e,
        "q/k norms, RoPE, head split": shape.num_layers * qk,
        "GELU": round(shape.num_layers * 5 * r * e),
    }


def optimizer_bytes(parameters: int) -> int:
    return parameters * OPTIMIZER_BYTES_PER_PARAMETER
