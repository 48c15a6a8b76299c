"""One CUDA graph per pack for the guided denoiser (dfmkit.generation.graphs): sampling with the graphs gives the
latents of eager sampling, packs of one shape reuse a graph with their own text, and nothing is captured off CUDA.

The CUDA tests run where a GPU is present and are skipped elsewhere."""

from __future__ import annotations

import contextlib

import pytest
import torch

import dit_harness as H
from dfmkit.components.objectives.edm import EDM
from dfmkit.components.samplers import make_sampler
from dfmkit.diffusion import guided_denoiser
from dfmkit.diffusion.objective import as_model_fn
from dfmkit.generation import graphs as graphs_module
from dfmkit.generation.graphs import GraphedDenoiser, PackGraphs, graphed_denoiser, whole_denoiser_graphs
from dfmkit.generation.sampling import SamplingModel
from dfmkit.parallel import ensure_initialized


def analytic_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x / (1 + sigma**2)


def test_nothing_is_captured_off_cuda():
    """Elsewhere the caller gets its own function back, and a cache keeps nothing."""
    x, sigma = torch.randn(4, 2, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    assert graphed_denoiser(analytic_denoiser, x, sigma) is analytic_denoiser
    guided = guided_denoiser(lambda x, c, b: x, EDM(condition_dropout=0.2), H.make_packs()[0], 2.0)
    graphs = PackGraphs()
    assert graphs.denoiser("pack", guided, x, sigma) is guided and len(graphs) == 0
    with pytest.raises(ValueError, match="max_packs must be at least 1"):
        PackGraphs(max_packs=0)


def test_graphs_are_on_by_default_for_generate_and_validation():
    from dfmkit.cli import build_parser
    from dfmkit.recipe import load_recipe

    args = ["generate", "--checkpoint", "c", "--prompt", "p", "--out", "o"]
    assert build_parser().parse_args(args).cuda_graphs
    assert not build_parser().parse_args([*args, "--no-cuda-graphs"]).cuda_graphs
    assert load_recipe({"sampler": {"name": "heun"}}).validation.cuda_graphs
    assert not load_recipe({"sampler": {"name": "heun"}}, ["validation.cuda_graphs=false"]).validation.cuda_graphs


def test_the_layers_own_cuda_graphs_are_not_captured_again():
    assert whole_denoiser_graphs(True, H.tiny_options(compile=True))
    assert not whole_denoiser_graphs(True, H.tiny_options(compile=True, cuda_graphs=True))
    assert not whole_denoiser_graphs(False, H.tiny_options())
    assert whole_denoiser_graphs(True, object())  # a backbone without such an option


@pytest.fixture(scope="module")
def tiny_dit_cpu():
    return H.sampling_model("cpu")


def test_a_guided_denoiser_conditions_on_other_text_in_place(tiny_dit_cpu):
    """What a kept graph relies on to sample other prompts of the same sizes: the denoiser's pack takes the new
    text in place, and then denoises as one made for that text; the caller's batch is not written to."""
    first, second = H.make_packs()[0], H.make_packs()[0]
    second.text = torch.randn(second.text.shape, generator=torch.Generator().manual_seed(7))
    model_fn = as_model_fn(tiny_dit_cpu, torch.device("cpu"), torch.float32)
    x = torch.randn(first.latents.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor(1.5, dtype=torch.float64)
    objective = EDM(condition_dropout=0.2)
    for guidance in (1.0, 4.0):
        reused = guided_denoiser(model_fn, objective, first, guidance)
        text = first.text.clone()
        with torch.no_grad():
            before = reused(x, sigma)
            reused.condition_on(second.text)
            got = reused(x, sigma)
            want = guided_denoiser(model_fn, objective, second, guidance)(x, sigma)
        assert torch.equal(got, want) and not torch.equal(got, before)
        assert torch.equal(first.text, text)
        with pytest.raises(ValueError, match="text states of shape"):
            reused.condition_on(second.text[1:])


# --------------------------------------------------------------------------------------------
# CUDA (run where a GPU is present; skipped elsewhere)
# --------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Two packs of different sizes in one call (max_tokens 16): [16 tokens] and [6 + 8 tokens], a video among them.
SHAPES = [(H.CHANNELS, 1, 8, 8), (H.CHANNELS, 1, 4, 6), (H.CHANNELS, 2, 4, 4)]
TEXT_LENGTHS = [5, 9, 1]


def cuda_sampling_model(dtype: torch.dtype, graphs: PackGraphs | None = None, **options) -> SamplingModel:
    model = H.sampling_model("cuda", dtype, use_cpu_initialization=True, **options)
    device = torch.device("cuda", torch.cuda.current_device())
    return SamplingModel(as_model_fn(model, device, dtype), EDM(condition_dropout=0.2), ensure_initialized(), device,
                         dtype, 2, 1, 1, graphs=graphs)


def prompts(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, H.TEXT_DIM, generator=g) for n in TEXT_LENGTHS]


def sample(sampling: SamplingModel, texts, cuda_graphs: bool, guidance: float) -> list[torch.Tensor]:
    return sampling.sample(make_sampler("heun", num_steps=4), texts, SHAPES, guidance=guidance, seed=3,
                           max_tokens=16, cuda_graphs=cuda_graphs)


@contextlib.contextmanager
def counting_captures(monkeypatch):
    captures = []
    init = GraphedDenoiser.__init__

    def counted(self, *args, **kwargs):
        captures.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(GraphedDenoiser, "__init__", counted)
    yield captures


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_cuda_graphs_sample_the_eager_latents(monkeypatch, dtype, guidance):
    """Each pack's evaluations replay one graph (two packs of different sizes: two captures), with the latents of
    eager sampling. The replay runs the kernels the eager evaluation runs, on the same inputs: in fp32 the same
    bits; in bf16 too, unless a library picks other kernels under capture, so bf16 allows rounding noise."""
    sampling = cuda_sampling_model(dtype)
    texts = prompts(0)
    eager = sample(sampling, texts, cuda_graphs=False, guidance=guidance)
    with counting_captures(monkeypatch) as captures:
        graphed = sample(sampling, texts, cuda_graphs=True, guidance=guidance)
    assert len(captures) == 2
    assert all(latent.isfinite().all() for latent in eager)
    for got, want in zip(graphed, eager):
        if dtype == torch.float32:
            assert torch.equal(got, want), (got - want).abs().max()
        else:
            assert (got - want).abs().max() <= 1e-2 * want.abs().max(), (got - want).abs().max()


@cuda
def test_cuda_graphs_are_kept_between_calls_and_sample_each_call_s_own_prompts(monkeypatch):
    """A Generator's graphs (PackGraphs): the next call with prompts of the same sizes replays the graphs captured
    by the first, conditioned on its own text, and gives that text's latents."""
    dtype = torch.float32
    kept = PackGraphs(max_packs=2)
    sampling = cuda_sampling_model(dtype, graphs=kept)
    with counting_captures(monkeypatch) as captures:
        sample(sampling, prompts(0), cuda_graphs=True, guidance=4.0)
        assert len(captures) == 2 and len(kept) == 2
        second = sample(sampling, prompts(1), cuda_graphs=True, guidance=4.0)
        assert len(captures) == 2  # replayed, not captured again
        sample(sampling, prompts(1), cuda_graphs=True, guidance=2.0)  # another guidance: other graphs
        assert len(captures) == 4 and len(kept) == 2
    eager = sample(cuda_sampling_model(dtype), prompts(1), cuda_graphs=False, guidance=4.0)
    for got, want in zip(second, eager):
        assert torch.equal(got, want), (got - want).abs().max()


@cuda
def test_cuda_an_evaluation_never_waits_for_the_device(monkeypatch):
    """After the first evaluation of a pack (which lays it out), eager evaluations and the sampler's loop make no
    synchronising call (torch's sync debug mode raises on any), and neither do graph replays."""
    sampling = cuda_sampling_model(torch.bfloat16)
    device = sampling.device
    cpu_batch = H.make_packs()[0]
    batch = cpu_batch.to(device, torch.bfloat16)
    denoise = guided_denoiser(sampling.model_fn, sampling.objective, batch, 4.0, torch.bfloat16)
    noise = torch.randn(batch.latents.shape, dtype=torch.float64, device=device)
    sigma = sampling.objective.sampling_sigmas(1, device)[0]
    denoise(noise, sigma)
    graphed = graphed_denoiser(denoise, noise, sigma)
    torch.cuda.synchronize()
    for function in (denoise, graphed):
        torch.cuda.set_sync_debug_mode("error")
        try:
            make_sampler("heun", num_steps=3).sample(function, noise, sampling.objective)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@cuda
def test_cuda_graphs_around_the_compiled_layers(monkeypatch):
    """model.compile without its own graphs: the compiled layers are compiled during the warm-up and captured like
    any kernels; the latents are those of the compiled model sampled eagerly."""
    torch._dynamo.reset()
    sampling = cuda_sampling_model(torch.bfloat16, compile=True)
    texts = prompts(0)
    eager = sample(sampling, texts, cuda_graphs=False, guidance=4.0)
    graphed = sample(sampling, texts, cuda_graphs=True, guidance=4.0)
    for got, want in zip(graphed, eager):
        assert (got - want).abs().max() <= 1e-2 * want.abs().max(), (got - want).abs().max()


@cuda
def test_cuda_capture_uses_one_side_stream_per_device():
    device = torch.device("cuda", torch.cuda.current_device())
    assert graphs_module.capture_stream(device) is graphs_module.capture_stream(device)
    assert graphs_module.capture_stream(device) != torch.cuda.current_stream(device)
