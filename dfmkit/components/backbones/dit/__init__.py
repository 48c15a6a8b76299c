"""DiT: a text-conditioned Diffusion Transformer over packed latent tokens, on megatron-core.

Read in this order, one job a file:

1. :mod:`.layers`: the small pieces: per-head RMSNorm, adaLN modulation of packed samples, 3D RoPE and
   3D sin-cos, the timestep embedding;
2. :mod:`.layout`: :class:`PackedLayout`, everything a forward needs to know about the pack (which sample each
   token belongs to, attention segments, which keys are real, positions), computed once per forward;
3. :mod:`.attention`: self- and cross-attention on megatron's column/row-parallel linears with a pluggable packed
   attention backend (:mod:`dfmkit.components.attention`), taken from the job's plugins;
4. :mod:`.block`: :class:`DiTLayer` (adaLN-Zero block: self-attention -> cross-attention -> GELU MLP) and its
   megatron ModuleSpec; megatron's ``TransformerBlock`` holds the layers (numbering, checkpoint keys
   ``decoder.layers.N``);
5. :mod:`.model`: :class:`DiT` (patch embedding, timestep embedding, the layers in turn, final adaLN layer),
   :func:`transformer_config` and :func:`build`, the ``dit`` backbone's factory.

The call: ``model(x [L, F], c_noise [N], batch) -> [L, F]``, the network output F_theta for each token (what it
means, and any preconditioning, is the objective's); see :mod:`.model` for parallelism. The Triton kernels the layers use on
CUDA in half precision live in :mod:`dfmkit.kernels`; the options (the recipe's ``[model]``) in
:mod:`dfmkit.components.backbones.options`.
"""

from dfmkit.components.backbones.dit.block import DiTLayer, dit_layer_spec
from dfmkit.components.backbones.dit.layers import Segments, apply_rope, rope3d, sincos3d
from dfmkit.components.backbones.dit.layout import PackedLayout, build_layout
from dfmkit.components.backbones.dit.model import DiT, DiTConfigError, DiTInputError, build, transformer_config

__all__ = [
    "DiT",
    "DiTConfigError",
    "DiTInputError",
    "DiTLayer",
    "PackedLayout",
    "Segments",
    "apply_rope",
    "build",
    "build_layout",
    "dit_layer_spec",
    "rope3d",
    "sincos3d",
    "transformer_config",
]
