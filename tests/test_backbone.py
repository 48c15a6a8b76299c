"""The DiT backbone in one process: registration, presets and parameter counts, packing semantics,
null text, attention backends, recomputation, and the errors bad input gets."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import dit_harness as H
from dfmkit.batch import BatchError, pack
from dfmkit.components.attention.base import VarlenParams
from dfmkit.components.attention.torch_backend import FlexDocumentAttention, SDPASegments
from dfmkit.components.backbones import dit
from dfmkit.components.backbones.options import DiTOptions
from dfmkit.parallel import split_for_context_parallel
from dfmkit.plugins import PluginManager
from dfmkit.recipe import ParallelConfig

# Parameter counts of the presets with default options (in_channels 16, p 2, pt 1, text_dim 1024,
# adaLN-LoRA rank 256), as built. The README's table shows these figures.
PARAMETER_COUNTS = {
    "S": 46_601_152,
    "B": 143_629_120,
    "L": 469_118_016,
    "XL": 673_297_984,
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = dit.build(H.tiny_options())
    H.randomize_(m)
    return m


def run(model, batch, seed=0):
    x, c_noise, _ = H.pack_inputs(batch, seed)
    return model(x, c_noise, batch), x, c_noise


# --------------------------------------------------------------------------------------------
# Registration, options, presets
# --------------------------------------------------------------------------------------------


def test_registered_through_the_hook():
    plugins = PluginManager(entry_points=False)
    assert "dit" in plugins.registries.backbone
    assert {"torch", "torch-sdpa", "torch-varlen", "torch-cudnn", "torch-flex"} <= set(plugins.registries.attention.names())
    assert ("te" in plugins.registries.attention) == _te_importable()


def _te_importable() -> bool:
    from dfmkit.components.attention import transformer_engine_importable

    return transformer_engine_importable()


@pytest.mark.parametrize("preset", list(PARAMETER_COUNTS))
def test_preset_parameter_counts(preset):
    model = dit.build(DiTOptions(preset=preset), device="meta")
    layers, hidden, heads = DiTOptions(preset=preset).resolved()
    assert len(model.decoder.layers) == layers and model.config.hidden_size == hidden
    assert model.config.num_attention_heads == heads
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[preset]
    assert DiTOptions(preset=preset).parameter_count() == PARAMETER_COUNTS[preset]


@pytest.mark.parametrize("changes", [dict(adaln_lora_rank=0), dict(mlp_ratio=2.5, text_dim=96, in_channels=3),
                                     dict(patch_temporal=2, timestep_channels=64, num_heads=4, hidden_size=96)])
def test_parameter_count_is_the_built_models(changes):
    options = DiTOptions(preset="S", **changes)
    assert options.parameter_count() == sum(p.numel() for p in dit.build(options, device="meta").parameters())


def test_a_model_whose_weights_cannot_fit_is_refused_before_it_is_built(monkeypatch):
    """A mistyped size gives one message naming it, instead of building layers until the memory runs out."""
    from dfmkit.components.backbones.dit import model as dit_model

    built = []
    monkeypatch.setattr(dit_model, "DiT", lambda *args, **kwargs: built.append(1))
    message = (r"model.num_layers 1000000000, hidden_size 384 and mlp_ratio 4 give 3\.\d+e\+15 parameters: "
               r"\d+\.\d GiB of fp32 weights, more than the \d+\.\d GiB of host memory available; "
               r"choose smaller sizes \(the presets: tiny .*, S \(12 layers")
    with pytest.raises(dit.DiTConfigError, match=message):
        dit.build(DiTOptions(preset="S", num_layers=10**9), device="cpu")
    monkeypatch.setattr(dit_model, "host_available", lambda: 4 * DiTOptions(preset="S").parameter_count())
    dit.build(DiTOptions(preset="S"), device="cpu")  # exactly fits
    with pytest.raises(dit.DiTConfigError, match="more than the"):
        dit.build(DiTOptions(preset="S", num_layers=13), device="cpu")
    assert built == [1]


def test_option_errors_name_the_values():
    with pytest.raises(ValueError, match="hidden_size 100 is not divisible by num_heads 6"):
        DiTOptions(preset="S", hidden_size=100)
    with pytest.raises(ValueError, match=r"even head dimension.*= 5"):
        DiTOptions(preset="tiny", hidden_size=20, num_heads=4)
    with pytest.raises(ValueError, match="divisible by 16, got 72"):
        DiTOptions(preset="tiny", hidden_size=72, num_heads=4, position_embedding="sincos3d")
    with pytest.raises(ValueError, match="cuda_graphs replays the compiled layers: set compile = true"):
        DiTOptions(preset="tiny", cuda_graphs=True)
    with pytest.raises(dit.DiTConfigError, match="num_heads 6 is not divisible by tensor parallelism 4"):
        dit.transformer_config(DiTOptions(preset="S"), tensor=4)


def test_recipe_section_validates_options():
    from dfmkit.errors import RecipeError
    from dfmkit.recipe import load_recipe

    registries = PluginManager(entry_points=False).registries
    with pytest.raises(RecipeError, match="model.*hidden_size 100 is not divisible by num_heads 16"):
        load_recipe({"model": {"name": "dit", "hidden_size": 100}}, registries=registries)
    recipe = load_recipe({"model": {"name": "dit", "preset": "B", "position_embedding": "sincos3d"}}, registries=registries)
    assert recipe.model.options.resolved() == (12, 768, 12)


# --------------------------------------------------------------------------------------------
# Packing semantics
# --------------------------------------------------------------------------------------------


def test_fresh_model_is_zero():
    """adaLN-Zero and a zero final projection: an untrained model outputs exactly 0."""
    model = dit.build(H.tiny_options())
    batch = H.make_packs()[0]
    out, _, _ = run(model, batch)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("position_embedding", ["rope3d", "sincos3d"])
def test_sample_in_a_pack_equals_the_sample_alone(position_embedding):
    torch.manual_seed(0)
    model = dit.build(H.tiny_options(position_embedding=position_embedding))
    H.randomize_(model)
    samples = H.make_samples(3, [(1, 6, 8), (3, 4, 4), (1, 2, 2)], [5, 9, 1])
    packed = pack(samples, 2, 1, pad_multiple=8)  # padding differs: 12 -> 16, 12 -> 16, 1 -> 8
    x, c_noise, _ = H.pack_inputs(packed, 0)
    out = model(x, c_noise, packed)
    for i, sample in enumerate(samples):
        alone = pack([sample], 2, 1)
        start, n = int(packed.cu_seqlens[i]), int(packed.seqlens[i])
        out_alone = model(x[start : start + n], c_noise[i : i + 1], alone)
        torch.testing.assert_close(out[start : start + n], out_alone, rtol=1e-5, atol=1e-5)


def _forward_backward(model, batch, seed=0):
    x, c_noise, target = H.pack_inputs(batch, seed)
    model.zero_grad(set_to_none=True)
    out = model(x, c_noise, batch)
    (out * target).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _equal_size_pack():
    return pack(H.make_samples(5, [(1, 4, 4)] * 3 + [(2, 2, 4)], [5, 9, 1, 3]), 2, 1)  # four samples of 4 tokens


@contextlib.contextmanager
def ieee_fp32_matmuls():
    """fp32 matrix products in full precision (no TF32 on a GPU) inside the block, through torch's precision API."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


@ieee_fp32_matmuls()  # the one-hot per-sample sums of the gather path are fp32 products
def test_equal_length_samples_broadcast_like_the_gather_path(monkeypatch):
    """Packs of equal-length samples take the reshape path; it must equal the general (gather) path."""
    torch.manual_seed(0)
    model = dit.build(H.tiny_options())
    H.randomize_(model)
    batch = _equal_size_pack()
    assert model.layout(batch).samples.equal
    out, grads = _forward_backward(model, batch)
    general = dit.build_layout
    monkeypatch.setattr(dit.model, "build_layout", lambda *a, **k: dataclasses.replace(  # where DiT.layout looks
        layout := general(*a, **k), samples=(seg := dit.Segments(layout.samples.ids, layout.samples.num_samples)),
        sp_samples=seg))
    batch = dataclasses.replace(batch)  # a new pack object: the model keeps the layout it built on the old one
    assert not model.layout(batch).samples.equal
    out_general, grads_general = _forward_backward(model, batch)
    torch.testing.assert_close(out, out_general, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_general[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_layers_give_the_eager_outputs_and_gradients():
    """model.compile compiles each layer with torch.compile (inductor; C++ on CPU here): the same numbers."""
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    eager = dit.build(H.tiny_options())
    compiled = dit.build(H.tiny_options(compile=True))
    H.randomize_(eager)
    compiled.load_state_dict(eager.state_dict())
    for batch in (_equal_size_pack(), H.make_packs()[0]):  # equal lengths and mixed
        out, grads = _forward_backward(eager, batch)
        out_c, grads_c = _forward_backward(compiled, batch)
        torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-5)
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])


def test_padding_content_does_not_leak(model):
    batch = H.make_packs()[0]
    out, x, c_noise = run(model, batch)
    noisy = torch.where(batch.token_mask()[:, None], x, torch.randn_like(x) * 100)
    out2 = model(noisy, c_noise, batch)
    mask = batch.token_mask()
    torch.testing.assert_close(out[mask], out2[mask], rtol=0, atol=1e-6)


def test_cross_attention_sees_only_its_own_text(model):
    batch = H.make_packs()[0]
    out, x, c_noise = run(model, batch)
    changed = batch.text.clone()
    cu_kv = batch.cu_seqlens_kv.tolist()
    changed[cu_kv[1] : cu_kv[2]] = torch.randn(cu_kv[2] - cu_kv[1], H.TEXT_DIM)  # sample 1's text
    out2 = model(x, c_noise, dataclasses.replace(batch, text=changed))
    ids, mask = batch.token_sample_ids(), batch.token_mask()
    for i in range(batch.num_samples):
        rows = (ids == i) & mask
        if i == 1:
            assert (out[rows] - out2[rows]).abs().max() > 1e-3
        else:
            torch.testing.assert_close(out[rows], out2[rows], rtol=0, atol=0)


def test_null_text_of_any_length_is_the_same_condition(model):
    """Bias-free k/v projections: zero text states give zero cross-attention whatever their length."""
    samples = H.make_samples(5, [(1, 4, 4), (2, 2, 4)], [1, 1])
    outs = []
    for length in (1, 7):
        for s in samples:
            s.text = torch.zeros(length, H.TEXT_DIM)
        batch = pack(samples, 2, 1)
        outs.append(run(model, batch)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    for layer in model.decoder.layers:
        assert layer.cross_attention.linear_kv.bias is None


def test_null_text_samples_skip_cross_attention_with_the_same_output(model):
    """A guided pack marks its unconditional half as null text, whose cross-attention the layers skip: the output
    equals the computed one, and no cross-attention projection sees those tokens."""
    batch = H.make_packs()[0].with_unconditional()
    assert batch.null_text_from == batch.num_samples // 2
    x, c_noise, _ = H.pack_inputs(batch, 0)
    seen = []
    hook = model.decoder.layers[0].cross_attention.linear_q.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        skipped = model(x, c_noise, batch)
        computed = model(x, c_noise, dataclasses.replace(batch, null_text_from=None))
    finally:
        hook.remove()
    assert seen == [batch.host("cu_seqlens")[batch.null_text_from], batch.num_tokens]
    torch.testing.assert_close(skipped, computed, rtol=1e-6, atol=1e-6)
    everything_null = dataclasses.replace(batch, text=torch.zeros_like(batch.text), null_text_from=0)
    torch.testing.assert_close(model(x, c_noise, everything_null),
                               model(x, c_noise, dataclasses.replace(everything_null, null_text_from=None)),
                               rtol=1e-6, atol=1e-6)


def test_null_text_skip_keeps_gradients():
    torch.manual_seed(0)
    m = dit.build(H.tiny_options())
    H.randomize_(m)
    batch = H.make_packs()[0].with_unconditional()
    x, c_noise, _ = H.pack_inputs(batch, 0)
    grads = []
    for marked in (batch, dataclasses.replace(batch, null_text_from=None)):
        m.zero_grad()
        m(x, c_noise, marked).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def _counting_text_projections(model) -> tuple[list[int], list]:
    calls = []
    hooks = [layer.cross_attention.linear_kv.register_forward_hook(lambda module, args, out: calls.append(1))
             for layer in model.decoder.layers]
    return calls, hooks


def test_text_keys_and_values_are_kept_between_forwards_without_autograd_until_text_or_weights_change():
    """Without autograd the cross-attentions keep the text's keys and values on the pack's layout: a second forward
    of the pack projects no text and gives the same output. Text or weights changed in place are projected again,
    into the kept tensors (which a CUDA graph reads), and the output is that of a fresh pack. With autograd
    (training) nothing is kept."""
    torch.manual_seed(0)
    m = dit.build(H.tiny_options(), device="cpu")
    H.randomize_(m)
    batch = H.make_packs()[0].with_unconditional()
    x, c_noise, _ = H.pack_inputs(batch, 0)
    layers = len(m.decoder.layers)
    calls, hooks = _counting_text_projections(m)
    try:
        with torch.no_grad():
            first = m(x, c_noise, batch)
            kept = {key: (k.data_ptr(), v.data_ptr()) for key, (_, (k, v)) in m.layout(batch).text_keys_values.items()}
            assert len(calls) == layers and len(kept) == layers
            assert torch.equal(m(x, c_noise, batch), first) and len(calls) == layers  # nothing projected again

            batch.text[:2].mul_(-0.5)  # other prompts written into the pack, as condition_on does
            fresh = dataclasses.replace(batch, text=batch.text.clone())
            assert torch.equal(m(x, c_noise, batch), m(x, c_noise, fresh))
            assert not torch.equal(m(x, c_noise, batch), first)
            m.decoder.layers[1].cross_attention.linear_kv.weight.mul_(1.5)  # in place, as the EMA swap does
            calls.clear()
            after_weights = m(x, c_noise, batch)
            assert len(calls) == 1  # only the changed layer projects its text again
            assert torch.equal(after_weights, m(x, c_noise, dataclasses.replace(batch, text=batch.text.clone())))
            again = {key: (k.data_ptr(), v.data_ptr()) for key, (_, (k, v)) in m.layout(batch).text_keys_values.items()}
            assert again == kept  # computed again into the same tensors

        calls.clear()
        trained = H.make_packs()[1]
        for _ in range(2):
            m(*H.pack_inputs(trained, 1)[:2], trained).sum().backward()
        assert len(calls) == 2 * layers and m.layout(trained).text_keys_values == {}
    finally:
        for hook in hooks:
            hook.remove()


def test_the_dit_runs_under_inference_mode():
    """Under torch.inference_mode tensors made there keep no version counter: the pack's layout is still kept (taken
    as unchanged), text made there is projected at every forward (a change to it could go unseen), and the outputs
    are those under no_grad. Before, the layout's version check raised at the first forward."""
    m = dit.build(H.tiny_options(), device="cpu")
    H.randomize_(m)
    batch = H.make_packs()[0].with_unconditional()
    x, c_noise, _ = H.pack_inputs(batch, 0)
    with torch.no_grad():
        want = m(x, c_noise, batch)
        halved = m(x, c_noise, dataclasses.replace(batch, text=batch.text * 0.5))
    calls, hooks = _counting_text_projections(m)
    try:
        with torch.inference_mode():
            assert torch.equal(m(x, c_noise, batch), want) and torch.equal(m(x, c_noise, batch), want)
            assert not calls  # the keys and values of the text made outside, kept from the no_grad forward
            made_here = dataclasses.replace(batch, text=batch.text.clone())
            assert made_here.text.is_inference()
            calls.clear()
            assert torch.equal(m(x, c_noise, made_here), want)
            made_here.text.mul_(0.5)
            assert torch.equal(m(x, c_noise, made_here), halved)
            assert len(calls) == 2 * len(m.decoder.layers)
    finally:
        for hook in hooks:
            hook.remove()


def test_conditioning_a_guided_denoiser_on_other_text_refreshes_the_kept_keys_and_values():
    """GuidedDenoiser.condition_on writes other text into its pack and has the network compute its kept keys and
    values again at once (what a CUDA graph replayed after it reads): they equal those of a fresh forward of the new
    text, before any forward of the pack, and so do the denoised outputs after it."""
    from dfmkit.components.objectives.edm import EDM
    from dfmkit.diffusion.guidance import guided_denoiser
    from dfmkit.diffusion.objective import as_model_fn

    model = H.sampling_model("cpu")
    model_fn = as_model_fn(model, torch.device("cpu"), torch.float32)
    batch = H.make_packs()[0]
    x = torch.randn(batch.latents.shape, dtype=torch.float64)
    sigma = torch.tensor(2.0, dtype=torch.float64)
    other_text = torch.randn_like(batch.text)
    with torch.no_grad():
        denoise = guided_denoiser(model_fn, EDM(condition_dropout=0.2), batch, 3.0, torch.float32)
        denoise(x, sigma)
        denoise.condition_on(other_text)
        kept = model.layout(denoise.pack).text_keys_values
        want = guided_denoiser(model_fn, EDM(condition_dropout=0.2), dataclasses.replace(batch, text=other_text), 3.0,
                               torch.float32)
        expected = want(x, sigma)
        for layer in model.decoder.layers:
            k, v = kept[id(layer.cross_attention)][1]
            want_k, want_v = model.layout(want.pack).text_keys_values[id(layer.cross_attention)][1]
            assert torch.equal(k, want_k) and torch.equal(v, want_v)
        assert torch.equal(denoise(x, sigma), expected)


def test_marked_null_text_must_be_a_sample_index():
    batch = H.make_packs()[0]
    with pytest.raises(BatchError, match="null_text_from 9 is not a sample index"):
        dataclasses.replace(batch, null_text_from=9).validate()


def test_positions_beyond_the_reference_table_are_distinct():
    """No fixed table: a 100 x 100 grid gives 10 000 different embeddings (the reference aliases > 40)."""
    pos = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(100), torch.arange(100), indexing="ij"), -1).reshape(-1, 3)
    cos, sin = dit.rope3d(pos, 64, 10000.0)
    angles = torch.cat([cos, sin], -1).reshape(len(pos), -1)
    assert torch.unique(angles.round(decimals=5), dim=0).shape[0] == len(pos)
    emb = dit.sincos3d(pos, 64)
    assert torch.unique(emb.round(decimals=5), dim=0).shape[0] == len(pos)


def test_every_parameter_gets_a_gradient(model):
    model.zero_grad()
    out, _, _ = run(model, H.make_packs()[0])
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing
    model.zero_grad()


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_gives_the_same_gradients(recompute):
    grads = {}
    for mode in ("none", recompute):
        model = dit.build(H.tiny_options(recompute=mode))
        H.randomize_(model)
        out, _, _ = run(model, H.make_packs()[0])
        out.square().mean().backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads["none"].items():
        torch.testing.assert_close(grads[recompute][name], grad, rtol=1e-5, atol=1e-7)


def test_bf16_forward_is_close_to_fp32(model):
    batch = H.make_packs()[0]
    out, x, c_noise = run(model, batch)
    low = dit.build(H.tiny_options())
    low.load_state_dict(model.state_dict())
    low.to(torch.bfloat16)
    out_low = low(x.bfloat16(), c_noise, batch.to("cpu", torch.bfloat16))
    assert out_low.dtype == torch.bfloat16
    assert (out_low.float() - out).abs().max() / out.abs().max() < 0.05


def test_sharded_state_dict_covers_every_parameter(model):
    sharded = model.sharded_state_dict(prefix="model.")
    names = {f"model.{n}" for n, _ in model.named_parameters()}
    assert names <= set(sharded)


# --------------------------------------------------------------------------------------------
# Attention backends
# --------------------------------------------------------------------------------------------


def _dense_reference(q, k, v, cu_q, cu_k):
    seg_q = torch.repeat_interleave(torch.arange(len(cu_q) - 1), torch.diff(torch.tensor(cu_q)))
    seg_k = torch.repeat_interleave(torch.arange(len(cu_k) - 1), torch.diff(torch.tensor(cu_k)))
    mask = seg_q[:, None] == seg_k[None, :]
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("backend", [SDPASegments, FlexDocumentAttention])
def test_backends_match_a_dense_masked_reference(backend):
    g = torch.Generator().manual_seed(0)
    cu_q, cu_k = [0, 5, 17, 18, 30], [0, 3, 4, 13, 20]
    q = torch.randn(cu_q[-1], 2, 8, generator=g)
    k = torch.randn(cu_k[-1], 2, 8, generator=g)
    v = torch.randn(cu_k[-1], 2, 8, generator=g)
    out = backend()(q, k, v, VarlenParams.from_host(cu_q, cu_k, "cpu"))
    torch.testing.assert_close(out, _dense_reference(q, k, v, cu_q, cu_k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cu_q, cu_k", [([0, 6, 12, 18], [0, 4, 8, 12]), ([0, 6, 12, 18], [0, 4, 8, 13])])
def test_sdpa_batches_equal_segments_with_the_same_result_and_gradients(cu_q, cu_k):
    """Equal-length segments go through one batched call; its values and gradients are the dense reference's."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, 2, 8, generator=g, requires_grad=True) for n in (cu_q[-1], cu_k[-1], cu_k[-1]))
    out = SDPASegments()(q, k, v, VarlenParams.from_host(cu_q, cu_k, "cpu"))
    weights = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref = _dense_reference(q, k, v, cu_q, cu_k)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()  # flex attention has no backward on CPU
def test_model_backends_agree():
    outputs = {}
    for name in ("torch", "torch-sdpa", "torch-flex"):
        model = dit.build(H.tiny_options(attention=name))
        H.randomize_(model)
        outputs[name] = run(model, H.make_packs()[0])[0]
    torch.testing.assert_close(outputs["torch-flex"], outputs["torch-sdpa"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["torch"], outputs["torch-sdpa"], rtol=0, atol=0)


def test_varlen_backend_refuses_cpu_clearly():
    from dfmkit.components.attention.torch_backend import AttentionBackendError, FlashVarlen

    q = torch.zeros(4, 1, 8)
    with pytest.raises(AttentionBackendError, match="needs CUDA tensors in bf16/fp16"):
        FlashVarlen()(q, q, q, VarlenParams.from_host([0, 4], [0, 4], "cpu"))


def test_unknown_backend_is_named():
    from dfmkit.errors import UnknownComponentError

    with pytest.raises(UnknownComponentError, match="unknown attention 'torch-sdp'; did you mean 'torch-sdpa'"):
        dit.build(H.tiny_options(attention="torch-sdp"))


def test_attention_backend_comes_from_the_jobs_plugins():
    """A backend a job's plugin registers is the one the job's model attends with, though the process-wide
    plugins (what a direct ``dit.build`` falls back to) do not know its name."""
    from dfmkit.errors import UnknownComponentError
    from dfmkit.hookspecs import hookimpl
    from dfmkit.job import Job
    from dfmkit.plugins import default_plugins
    from dfmkit.recipe import load_recipe

    calls = []

    class CountedSDPA(SDPASegments):
        def forward(self, q, k, v, params):
            calls.append(q.shape)
            return super().forward(q, k, v, params)

    class Plugin:
        @hookimpl
        def dfmkit_register(self, registries):
            registries.attention.register("counted-sdpa", lambda options, **context: CountedSDPA())

    plugins = PluginManager(entry_points=False, extra=[(Plugin(), "tests")])
    model_section = {"name": "dit", "preset": "tiny", "in_channels": H.CHANNELS, "text_dim": H.TEXT_DIM,
                     "adaln_lora_rank": 16, "attention": "counted-sdpa"}
    job = Job(load_recipe({"model": model_section}, registries=plugins.registries), plugins)
    model = job.components["model"].build(recipe=job.recipe)
    assert "counted-sdpa" not in default_plugins().registries.attention
    with pytest.raises(UnknownComponentError, match="unknown attention 'counted-sdpa'"):
        dit.build(job.recipe.model.options)

    batch = H.make_packs()[0]
    with torch.no_grad():
        out, _, _ = run(model, batch)
    layers = model.config.num_layers
    assert len(calls) == 2 * layers  # self- and cross-attention of every layer
    assert all(shape[0] == batch.num_tokens for shape in calls)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(model):
    batch = H.make_packs()[0]
    x, c_noise, _ = H.pack_inputs(batch, 0)
    with pytest.raises(dit.DiTInputError, match=rf"x must be \[{batch.num_tokens}, 16\].*got \({batch.num_tokens}, 12\)"):
        model(x[:, :12], c_noise, batch)
    with pytest.raises(dit.DiTInputError, match="c_noise has 3 values for 4 samples"):
        model(x, c_noise[:3], batch)
    with pytest.raises(dit.DiTInputError, match="text states have width 8, the model was built with text_dim 24"):
        model(x, c_noise, dataclasses.replace(batch, text=batch.text[:, :8]))
    bad_cu = batch.cu_seqlens.clone()
    bad_cu[-1] += 8
    with pytest.raises(BatchError, match=rf"cu_seqlens \[0, 16, 32, 40, 56\] must rise from 0 to the {batch.num_tokens} latent"):
        model(x, c_noise, dataclasses.replace(batch, cu_seqlens=bad_cu))
    bad_cu = batch.cu_seqlens.clone()
    bad_cu[3] = bad_cu[2] + 2
    with pytest.raises(BatchError, match=r"seqlens \[12, 12, 3, 2\] must each be >= 1 and <= the padded lengths \[16, 16, 2, 14\]"):
        model(x, c_noise, dataclasses.replace(batch, cu_seqlens=bad_cu))
    with pytest.raises(BatchError, match=r"cu_seqlens_kv \[0, 5, 14, 15, 18\] must rise from 0 to the 17 text tokens"):
        model(x, c_noise, dataclasses.replace(batch, text=batch.text[:17]))
    empty = dataclasses.replace(
        batch, seqlens_kv=torch.tensor([5, 9, 0, 4], dtype=torch.int32),
        cu_seqlens_kv=torch.tensor([0, 5, 14, 14, 18], dtype=torch.int32),
    )
    with pytest.raises(dit.DiTInputError, match=r"at least one text token \(seqlens_kv \[5, 9, 0, 4\]\)"):
        model(x, c_noise, empty)
    shard = split_for_context_parallel(batch, 2, 0)
    with pytest.raises(dit.DiTInputError, match="context-parallel shard"):
        model(shard.latents, c_noise, shard)


def test_sequence_parallel_without_tensor_parallel_is_an_error():
    with pytest.raises(ValueError, match="sequence = true needs tensor > 1"):
        ParallelConfig(tensor=1, sequence=True)


def test_parallel_layout_that_does_not_fit_the_world():
    from dfmkit.parallel import ParallelError, initialize

    with pytest.raises(ParallelError, match="1 processes cannot be split into tensor parallelism 2 x context parallelism 1"):
        initialize(ParallelConfig(tensor=2))


# --------------------------------------------------------------------------------------------
# CUDA (run where a GPU is present; skipped elsewhere)
# --------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("head_dim", [64, 72])
@pytest.mark.parametrize("cu_q, cu_k", [
    ([0, 130, 1154, 1160, 1700], [0, 100, 1024, 1030, 1600]),  # mixed lengths: flash varlen
    ([0, 256, 512, 768], [0, 77, 154, 231]),  # equal lengths: cuDNN, batched
])
def test_cuda_backends_match_sdpa_forward_and_backward(head_dim, cu_q, cu_k):
    from dfmkit.components.attention.torch_backend import (
        AutoTorchAttention,
        CudnnEqualSegments,
        FlashVarlen,
        varlen_available,
    )

    g = torch.Generator(device="cuda").manual_seed(0)
    params = VarlenParams.from_host(cu_q, cu_k, "cuda")
    shape_q, shape_k = (cu_q[-1], 4, head_dim), (cu_k[-1], 4, head_dim)
    q = torch.randn(shape_q, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(shape_k, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(shape_k, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(shape_q, generator=g, device="cuda", dtype=torch.bfloat16)
    assert varlen_available(q)

    def run_backend(backend):
        for t in (q, k, v):
            t.grad = None
        out = backend(q, k, v, params)
        out.backward(grad)
        return [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]

    expected = run_backend(SDPASegments())
    for backend in (FlashVarlen(), AutoTorchAttention(), CudnnEqualSegments(), FlexDocumentAttention()):
        for got, want in zip(run_backend(backend), expected):
            assert (got - want).abs().max() <= 2e-2 * want.abs().max(), type(backend).__name__


@cuda
@pytest.mark.parametrize("equal_sizes", [False, True])
def test_cuda_model_in_bf16_with_each_backend(equal_sizes):
    outputs, grads = {}, {}
    cpu_batch = _equal_size_pack() if equal_sizes else H.make_packs()[0]
    batch = cpu_batch.to("cuda", torch.bfloat16)
    for name in ("torch", "torch-sdpa", "torch-flex", "torch-cudnn"):
        model = dit.build(H.tiny_options(attention=name, use_cpu_initialization=True))
        H.randomize_(model)
        model.to(torch.bfloat16)
        x, c_noise, _ = (t.cuda() for t in H.pack_inputs(cpu_batch, 0))
        out = model(x, c_noise, batch)
        out.float().square().mean().backward()
        outputs[name] = out.float()
        grads[name] = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    for name in ("torch", "torch-flex", "torch-cudnn"):
        assert (outputs[name] - outputs["torch-sdpa"]).abs().max() <= 3e-2 * outputs["torch-sdpa"].abs().max(), name
        assert (grads[name] - grads["torch-sdpa"]).norm() <= 3e-2 * grads["torch-sdpa"].norm(), name


@cuda
def test_cuda_gpu_initialisation_builds_on_the_device():
    model = dit.build(DiTOptions(preset="S"))
    assert all(p.is_cuda for p in model.parameters())
    first = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert 0.015 < float(first.detach().float().std()) < 0.025  # N(0, 0.02) from megatron's GPU init path


@cuda
@pytest.mark.parametrize("attention, graphs", [("torch-varlen", 6), ("torch", 10)])
def test_cuda_compiled_model_serves_packs_of_varied_sizes_without_recompiling_each(attention, graphs):
    """model.compile on a GPU: after the first shape change the layer graph is shape-generic, so packs of
    other sizes and sample counts reuse it (a recompile per pack would soon exhaust dynamo's cache), and
    no backend breaks the layer graph. The default backend takes cuDNN where a pack's self- or
    cross-attention segments happen to have equal lengths: one graph more for each such combination. Each
    graph comes twice: the first layer has no residual of a layer before to add."""
    from torch._dynamo.utils import counters

    counters.clear()
    torch._dynamo.reset()
    model = dit.build(H.tiny_options(compile=True, attention=attention, use_cpu_initialization=True))
    H.randomize_(model)
    model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    for i in range(10):
        count = 2 + i
        shapes = [(1, 2 * int(torch.randint(1, 5, (1,), generator=g)), 2 * int(torch.randint(1, 5, (1,), generator=g)))
                  for _ in range(count)]
        texts = [int(torch.randint(1, 12, (1,), generator=g)) for _ in range(count)]
        cpu_batch = pack(H.make_samples(20 + i, shapes, texts), 2, 1, pad_multiple=8)
        x, c_noise, _ = (t.cuda() for t in H.pack_inputs(cpu_batch, i))
        out = model(x, c_noise, cpu_batch.to("cuda", torch.bfloat16))
        out.float().square().mean().backward()
    assert counters["stats"]["unique_graphs"] <= graphs, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@cuda
def test_cuda_graphs_replay_the_compiled_layers_with_the_results_of_the_compiled_model():
    """model.cuda_graphs: the compiled layers (fused kernels included) run as CUDA graph replays, which see
    each step's new weights and inputs: outputs and gradients step after step as those of the compiled model
    without graphs, and no graph is skipped."""
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    cpu_batch = _equal_size_pack()
    batch = cpu_batch.to("cuda", torch.bfloat16)
    runs = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = dit.build(H.tiny_options(compile=True, cuda_graphs=graphs, use_cpu_initialization=True))
        H.randomize_(model)
        model.to(torch.bfloat16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        steps = []
        for step in range(5):  # graphs: a warm-up call, a recording, then replays
            x, c_noise, _ = (t.cuda() for t in H.pack_inputs(cpu_batch, step))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                out = model(x, c_noise, batch)
                out.float().square().mean().backward()
            launches = sum("cudaGraphLaunch" in e.name for e in prof.events())
            grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
            steps.append((out.float().clone(), grads, launches))  # a clone: the next replay reuses the memory
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        runs[graphs] = steps
        assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert runs[True][-1][2] > 0 and runs[False][-1][2] == 0, "the graph variant replays no CUDA graph"
    assert (runs[False][-1][0] - runs[False][0][0]).abs().max() > 0.1  # the weights and inputs do change
    for (out, grads, _), (want_out, want_grads, _) in zip(runs[True], runs[False]):
        assert (out - want_out).abs().max() <= 2e-2 * want_out.abs().max()
        assert (grads - want_grads).norm() <= 2e-2 * want_grads.norm()
