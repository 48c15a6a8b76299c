"""The DiT model: patch embedding, timestep embedding, the DiT layers in turn, the final adaLN layer; and
:func:`build`, the ``dit`` backbone's factory.

The call: ``model(x [L, F], c_noise [N], batch) -> [L, F]``, the network output F_theta for each token (what it
means, and any preconditioning, is the objective's). ``batch`` is a :class:`~dfmkit.batch.PackedBatch`, or under
context parallelism this rank's :class:`~dfmkit.parallel.ContextParallelBatch` with ``x`` its tokens.

Parallelism: tensor parallelism splits heads (q/k/v, fc1 column-parallel; output projections and fc2
row-parallel); every TP rank gets the same inputs and returns the same output. Sequence parallelism
scatters the tokens across TP ranks after the patch embedding and gathers them before the final
layer; because the adaLN modulation of a sample then only sees part of its tokens on each rank, its
gradient is all-reduced over the TP group inside the layer, so no parameter needs a sequence-parallel
gradient reduction. Context parallelism: see :mod:`dfmkit.parallel.context`; keys and values are
all-gathered over the CP group inside self-attention.

Gradient reductions left to the caller (megatron DDP + ``finalize_model_grads``, as the trainer runs them in
:mod:`dfmkit.train.step`): sum over DP and CP, and sum over TP of the per-head q/k RMSNorm weights (named
``q_layernorm``/``k_layernorm``; ``config.qk_layernorm`` is set so megatron does it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from dfmkit.batch import BatchError, PackedBatch
from dfmkit.components.backbones.dit.block import dit_layer_spec
from dfmkit.components.backbones.dit.layers import (
    Segments,
    TimestepEmbedding,
    add_norm_modulate,
    gated_residual,
    sincos3d,
)
from dfmkit.components.backbones.dit.layout import PackedLayout, build_layout
from dfmkit.components.backbones.options import PRESETS, DiTOptions
from dfmkit.devices import device_available, host_available
from dfmkit.errors import DfmkitError
from dfmkit.parallel.context import ContextParallelBatch
from dfmkit.parallel.state import ensure_initialized
from dfmkit.plugins import default_plugins
from dfmkit.registry import Registries, Registry


class DiTInputError(BatchError):
    """Model inputs that disagree with each other, the model or the parallel layout."""


class DiTConfigError(DfmkitError):
    """DiT options that do not fit the parallel layout."""


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
        _, x = add_norm_modulate(x, mlp_residual, shift, scale, seg, self.eps, self.fused_kernels)
        return self.linear(x.squeeze(1))


class DiT(MegatronModule):
    """``forward(x [L, F], c_noise [N], batch) -> [L, F]``; see the module docstring."""

    def __init__(self, config: TransformerConfig, options: DiTOptions, *, attention_registry: Registry):
        """``attention_registry``: where ``options.attention`` names the packed attention backend (the job's
        ``registries.attention``)."""
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
        spec = dit_layer_spec(options.attention, options.adaln_lora_rank, options.text_dim, options.fused_kernels,
                              attention_registry=attention_registry)
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
        zeroed = [layer.adaln.net[-1] for layer in self.decoder.layers]
        zeroed += [self.final_layer.adaln[-1], self.final_layer.linear]
        for module in zeroed:
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
            raise DiTInputError(
                f"a context-parallel shard (CP {batch.cp_size}) given to a model built without context parallelism"
            )
        batch.validate()
        if x.ndim != 2 or x.shape != (batch.num_tokens, self.in_features):
            raise DiTInputError(
                f"x must be [{batch.num_tokens}, {self.in_features}] (the batch's tokens x p*p*pt*C), "
                f"got {tuple(x.shape)}"
            )
        if c_noise.numel() != batch.num_samples:
            raise DiTInputError(
                f"c_noise has {c_noise.numel()} values for {batch.num_samples} samples (one per sample)"
            )
        if batch.text.shape[-1] != self.text_dim:
            raise DiTInputError(
                f"text states have width {batch.text.shape[-1]}, the model was built with text_dim {self.text_dim}"
            )
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
        """The pack's layout for this model, built once per pack and kept on the batch
        (:meth:`~dfmkit.batch.PackedBatch.derived`): a sampler's forwards of one pack, and a CUDA graph captured
        from one of them, reuse its tensors instead of copying index lists to the device at every forward."""
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        cp_group = parallel_state.get_context_parallel_group() if self.cp_size > 1 else None
        dtype = self.x_embedder.weight.dtype
        key = ("dit_layout", self.tp_size, tp_rank, self.sequence_parallel, cp_group, self.rope, dtype,
               batch.null_text_from)
        return batch.derived(
            key,
            lambda: build_layout(batch, tp_size=self.tp_size, tp_rank=tp_rank, sequence_parallel=self.sequence_parallel,
                                 cp_group=cp_group, rope=self.rope, dtype=dtype),
            (*batch.LAYOUT_FIELDS, "cu_seqlens_kv", "pos_ids"),
        )

    @torch.no_grad()
    def refresh_text(self, batch: PackedBatch) -> None:
        """Compute again, in place, what the layers keep of ``batch``'s text between forwards without autograd (each
        cross-attention's keys and values: :meth:`CrossAttention.text_keys_values`), now that the text or the weights
        changed in place: a CUDA graph captured from a forward of this pack reads them and does not compute them."""
        layout = self.layout(batch)
        context = batch.text.to(self.x_embedder.weight.dtype).unsqueeze(1)
        for layer in self.decoder.layers:
            layer.cross_attention.text_keys_values(context, layout)

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
        h, mlp_residual = self.run_layers(h, F.silu(c), context, layout)  # each layer's adaLN starts with SiLU(c)
        if self.sequence_parallel:  # the final layer takes whole samples: add the last residual before the gather
            h = gated_residual(h, *mlp_residual, layout.sp_samples)
            h = tensor_parallel.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
            mlp_residual = None
        return self.final_layer(h, c, layout.samples, mlp_residual)

    def run_layers(self, x: torch.Tensor, silu_c: torch.Tensor, context: torch.Tensor, layout: PackedLayout):
        """The layers in turn: ``(x, (MLP output, gate))`` of the last one (see :class:`DiTLayer`). With full
        recomputation each layer's activations are recomputed in the backward from its inputs
        (``recompute_method`` uniform, one layer a chunk, as megatron's ``TransformerBlock`` would)."""
        recompute = self.config.recompute_granularity == "full" and self.training
        mlp_residual = None
        for layer in self.decoder.layers:
            if recompute:
                def run(x, silu_c, context, *residual, layer=layer):
                    return layer(x, silu_c, context, layout, residual or None)

                x, h, gate = tensor_parallel.checkpoint(run, False, x, silu_c, context, *(mlp_residual or ()))
            else:
                x, h, gate = layer(x, silu_c, context, layout, mlp_residual)
            mlp_residual = (h, gate)
        return x, mlp_residual


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


def build(options: DiTOptions, *, recipe=None, registries: Registries | None = None, parallel=None,
          device: str | torch.device | None = None, **_context) -> DiT:
    """The DiT for ``options`` under ``recipe.parallel`` (or ``parallel``; default: megatron's current groups).

    megatron's parallel_state must be set up by the caller (:func:`dfmkit.parallel.initialize`) when
    tensor or context parallelism is above 1. With neither above 1 and nothing set up, a one-process
    world is created (:func:`dfmkit.parallel.ensure_initialized`). Weights are fp32 (the training loop
    casts). The model is built on the current CUDA device when there is a GPU, else on the CPU (where
    ``use_cpu_initialization`` is forced on); ``device="meta"`` builds without memory (parameter counts).
    With ``use_cpu_initialization`` every weight matrix is drawn whole and then sliced, so the same seed
    gives the same model for every tensor-parallel size.

    ``registries``: the job's (:meth:`dfmkit.job.ResolvedComponent.build` passes them), where the attention
    backend ``options.attention`` is looked up; without them (a direct call) the process-wide
    :func:`dfmkit.plugins.default_plugins`.
    """
    if registries is None:
        registries = default_plugins().registries
    if parallel is None and recipe is not None:
        parallel = recipe.parallel
    current = ensure_initialized(parallel)
    sequence = bool(parallel.sequence) if parallel is not None else current.sequence_parallel
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    check_fits(options, device, current.tp_size)
    cpu_init = options.use_cpu_initialization or device.type != "cuda"
    config = transformer_config(options, tensor=current.tp_size, context=current.cp_size, sequence=sequence,
                                use_cpu_initialization=cpu_init)
    with torch.device(device):
        return DiT(config, options, attention_registry=registries.attention)


def check_fits(options: DiTOptions, device: torch.device, tensor: int = 1) -> None:
    """A :class:`DiTConfigError` before anything is built when the model's fp32 weights alone exceed the memory
    available where they are made (the host for CPU initialisation, else the GPU, which holds a ``1 / tensor``
    share): a mistyped size (``num_layers = 1000000000``) is one message, not hours of building layers until the
    machine runs out."""
    if device.type == "meta":
        return
    cpu = options.use_cpu_initialization or device.type != "cuda"
    available = host_available() if cpu else device_available(device)
    parameters = options.parameter_count()
    weights = parameters * 4 // (1 if cpu else tensor)
    if available is not None and weights > available:
        layers, hidden, heads = options.resolved()
        raise DiTConfigError(
            f"model.num_layers {layers}, hidden_size {hidden} and mlp_ratio {options.mlp_ratio:g} give "
            f"{parameters:.3g} parameters: {weights / 2**30:.1f} GiB of fp32 weights, more than the "
            f"{available / 2**30:.1f} GiB of {'host' if cpu else 'GPU'} memory available; choose smaller sizes "
            f"(the presets: {', '.join(f'{name} ({n} layers, hidden {h})' for name, (n, h, _) in PRESETS.items())})")
