"""The samplers under each objective against data with an exact denoiser: moments, convergence order, guidance on
packed sequences."""

from __future__ import annotations

import math
import tomllib
import warnings

import pytest
import torch

from dfmkit.components.objectives import EDMOptions, RectifiedFlowOptions
from dfmkit.components.objectives.edm import EDM, karras_sigmas
from dfmkit.components.objectives.rectified_flow import RectifiedFlow, shift_times
from dfmkit.components.samplers import HeunOptions, make_sampler
from dfmkit.components.samplers.heun import Euler, Heun, Sampler
from dfmkit.diffusion import from_reference_scale, guided_denoiser, warn_if_unguidable
from dfmkit.diffusion.analytic import GaussianMixture, convergence_order
from dfmkit.errors import DfmkitError, RecipeError
from dfmkit.plugins import PluginManager
from dfmkit.recipe import dump_recipe, load_recipe
from toys import TOY_SECTIONS, ToyComponents
from test_edm import make_pack

GAUSSIAN = GaussianMixture.gaussian(0.3, 0.7)
MIXTURE = GaussianMixture(means=(-1.0, 0.5, 2.0), stds=(0.3, 0.2, 0.5), weights=(0.3, 0.5, 0.2))


pytestmark = pytest.mark.usefixtures("one_thread")

OBJECTIVES = [EDM(), RectifiedFlow()]
objectives = pytest.mark.parametrize("objective", OBJECTIVES, ids=["edm", "rectified-flow"])


def quantile_noise(n: int = 4001) -> torch.Tensor:
    """Unit-Gaussian quantiles: no sampling error in the moments, only the sampler's own."""
    return torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)


# -- schedule and options --------------------------------------------------------------------


def test_karras_schedule():
    sigmas = karras_sigmas(35, 0.002, 80.0, 7.0)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (36,)
    assert float(sigmas[0]) == pytest.approx(80.0) and float(sigmas[34]) == pytest.approx(0.002) and sigmas[35] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    i = 10
    expected = (80 ** (1 / 7) + i / 34 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert float(sigmas[i]) == pytest.approx(expected, rel=1e-12)
    assert karras_sigmas(1, 0.002, 80.0, 7.0).tolist() == [80.0, 0.0]
    assert torch.equal(EDM(sigma_max=20.0, rho=3.0).sampling_sigmas(8), karras_sigmas(8, 0.002, 20.0, 3.0))


def test_rectified_flow_grid_is_uniform_from_one_to_zero_and_shifts_towards_noise():
    t = RectifiedFlow().sampling_sigmas(4)
    assert t.dtype == torch.float64 and t.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = RectifiedFlow(sample_shift=3.0).sampling_sigmas(4)
    assert shifted[0] == 1 and shifted[-1] == 0 and torch.all(shifted[1:] < shifted[:-1])
    assert float(shifted[2]) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))  # s t / (1 + (s - 1) t)
    assert torch.all(shifted[1:-1] > t[1:-1])  # more of the steps at high noise


def test_rectified_flow_can_sample_each_size_on_the_grid_its_tokens_have_in_training():
    """sample_shift_by_tokens: the objective of samples of n tokens has the grid shifted by the training shift of n
    tokens (Flux's sampling); the objective itself has no single grid, and a fixed sample_shift beside the flag is
    refused (one of them would be ignored)."""
    flow = RectifiedFlow(shift_by_tokens=True, sample_shift_by_tokens=True)
    assert flow.grid_by_tokens and not RectifiedFlow().grid_by_tokens and RectifiedFlow().for_tokens(64) == RectifiedFlow()
    for tokens in (16, 256, 1024, 4096):
        want = shift_times(RectifiedFlow().sampling_sigmas(8), math.exp(0.5 + 0.65 * (tokens - 256) / 3840))
        torch.testing.assert_close(flow.for_tokens(tokens).sampling_sigmas(8), want, rtol=1e-12, atol=1e-12)
        assert float(flow.shift_of(float(tokens))) == pytest.approx(float(flow.shift_of(torch.tensor(float(tokens)))))
    assert float(flow.for_tokens(4096).sampling_sigmas(8)[4]) > float(flow.for_tokens(256).sampling_sigmas(8)[4])
    with pytest.raises(ValueError, match="the grid depends on the samples' size"):
        flow.sampling_sigmas(8)
    with pytest.raises(ValueError, match=r"'sample_shift' \(3.0\) and 'sample_shift_by_tokens' are both set"):
        RectifiedFlowOptions(sample_shift=3.0, sample_shift_by_tokens=True)


def test_sizes_are_sampled_in_packs_of_their_own_where_the_grid_depends_on_the_size():
    """With a grid by tokens, a call of prompts of two sizes samples each size in packs of its own on its own grid:
    each latent equals that size sampled alone with sample_shift fixed to its shift, from the same seed (latent i:
    seed + i, whatever pack it lands in)."""
    import dit_harness as H

    from dfmkit.diffusion.objective import as_model_fn
    from dfmkit.generation.sampling import SamplingModel, split_packs
    from dfmkit.parallel import ensure_initialized

    shapes = [(H.CHANNELS, 1, 8, 8), (H.CHANNELS, 1, 4, 6), (H.CHANNELS, 1, 8, 8), (H.CHANNELS, 2, 4, 4)]
    assert split_packs(shapes, 2, 1, 0, 1) == [[0, 1, 2, 3]]
    assert split_packs(shapes, 2, 1, 0, 1, by_size=True) == [[0, 2], [1], [3]]  # 16, 6 and 8 tokens
    assert split_packs(shapes, 2, 1, 16, 1, by_size=True) == [[0], [2], [1], [3]]
    texts = [torch.randn(n, H.TEXT_DIM, generator=torch.Generator().manual_seed(n)) for n in (3, 5, 2, 4)]
    model_fn = as_model_fn(H.sampling_model("cpu"), torch.device("cpu"), torch.float32)
    env = ensure_initialized()

    def sample(objective, indices):
        sampling = SamplingModel(model_fn, objective, env, torch.device("cpu"), torch.float32, 2, 1, 1)
        return sampling.sample(make_sampler("euler", num_steps=3), [texts[i] for i in indices],
                               [shapes[i] for i in indices], guidance=2.0, seed=7 + indices[0])

    by_tokens = RectifiedFlow(condition_dropout=0.2, shift_by_tokens=True, sample_shift_by_tokens=True)
    together = sample(by_tokens, [0, 1, 2, 3])
    for i, tokens in enumerate((16, 6, 16, 8)):
        alone = sample(RectifiedFlow(condition_dropout=0.2, shift_by_tokens=True,
                                     sample_shift=float(by_tokens.shift_of(float(tokens)))), [i])[0]
        torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-5)
    fixed = sample(RectifiedFlow(condition_dropout=0.2, shift_by_tokens=True), [0, 1, 2, 3])
    assert not torch.allclose(fixed[1], together[1], atol=1e-3)  # another grid: another sample


@pytest.mark.parametrize(
    ("options_class", "options", "message"),
    [
        (EDMOptions, dict(sigma_min=80.0), "'sigma_min' must be less than sigma_max, got 80.0 >= 80.0"),
        (EDMOptions, dict(sigma_min=1.0, sigma_max=0.5), "'sigma_min' must be less than sigma_max"),
        (HeunOptions, dict(num_steps=0), "'num_steps' must be from 1 to 100000, got 0"),
        (EDMOptions, dict(sigma_min=-0.1), "'sigma_min' must be > 0: -0.1"),
        (EDMOptions, dict(rho=float("nan")), "'rho' must be > 0: nan"),
        (HeunOptions, dict(s_churn=-1.0), "'s_churn' must be a finite number >= 0"),
        (HeunOptions, dict(s_min=2.0, s_max=1.0), "'s_min' must not exceed s_max"),
    ],
)
def test_bad_options_are_clear(options_class, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        options_class(**options)


def toy_registries():
    return PluginManager(extra=[(ToyComponents(), "toy-dist 1.0")]).registries


def test_recipe_resolves_samplers_and_reports_bad_options():
    registries = toy_registries()
    assert registries.sampler.get("edm-heun").origin == "built-in"
    recipe = load_recipe({**TOY_SECTIONS, "sampler": {"name": "edm-heun", "num_steps": 18, "s_churn": 40}},
                         registries=registries)
    assert isinstance(recipe.sampler.options, HeunOptions)
    assert (recipe.sampler.options.num_steps, recipe.sampler.options.s_churn) == (18, 40.0)
    reloaded = load_recipe(tomllib.loads(dump_recipe(recipe, registries=registries)), registries=registries)
    assert reloaded.sampler.options == recipe.sampler.options  # s_max = inf survives TOML

    default = load_recipe({k: v for k, v in TOY_SECTIONS.items() if k != "sampler"}, registries=registries)
    assert default.sampler.name == "heun" and default.sampler.options == HeunOptions()

    bad = {"sampler": {"name": "euler", "num_step": 10, "s_churn": 1.0}, "diffusion": {"sigma_min": 90.0}}
    with pytest.raises(RecipeError) as info:
        load_recipe({**TOY_SECTIONS, **bad}, registries=registries)
    assert set(info.value.problems) == {
        "sampler.num_step: unknown key; did you mean sampler.num_steps?",
        "sampler.s_churn: unknown key; known keys: name, num_steps",
        "diffusion.sigma_min: must be less than sigma_max, got 90.0 >= 80.0",  # reported with them, not after
    }


def test_recipes_from_before_objectives_keep_their_sampling_grid():
    """Their [sampler] held sigma_min, sigma_max and rho: these now belong to the objective, and move there."""
    registries = toy_registries()
    old = load_recipe({**TOY_SECTIONS, "sampler": {"name": "edm-heun", "num_steps": 9, "sigma_max": 40.0, "rho": 5.0}},
                      registries=registries)
    assert old.sampler.name == "edm-heun" and old.sampler.options == HeunOptions(num_steps=9)
    assert old.diffusion.name == "edm" and old.diffusion.options == EDMOptions(sigma_max=40.0, rho=5.0)
    assert "sigma_max" not in tomllib.loads(dump_recipe(old, registries=registries))["sampler"]
    with pytest.raises(RecipeError) as info:
        load_recipe({**TOY_SECTIONS, "sampler": {"name": "heun", "sigma_min": 90.0}}, registries=registries)
    assert info.value.problems == ["diffusion.sigma_min: must be less than sigma_max, got 90.0 >= 80.0"]
    with pytest.raises(RecipeError) as info:
        load_recipe({**TOY_SECTIONS, "sampler": {"name": "heun", "sigma_max": 90.0},
                     "diffusion": {"sigma_max": 50.0}}, registries=registries)
    assert info.value.problems == ["sampler.sigma_max: the sampling grid is the objective's; this recipe sets "
                                   "sampler.sigma_max = 90.0 and diffusion.sigma_max = 50.0: keep diffusion.sigma_max "
                                   "only"]
    with pytest.raises(RecipeError, match="sampler.num_steps: must be from 1 to 100000, got 0"):
        load_recipe({**TOY_SECTIONS, "sampler": {"name": "edm-heun"}}, ["sampler.num_steps=0"], registries=registries)


def test_make_sampler():
    sampler = make_sampler("euler", num_steps=7)
    assert isinstance(sampler, Euler) and isinstance(sampler, Sampler) and sampler.num_evaluations == 7
    assert make_sampler(num_steps=7).num_evaluations == 13
    assert isinstance(make_sampler("edm-heun"), Heun) and isinstance(make_sampler("edm-euler"), Euler)  # older names
    with pytest.raises(DfmkitError, match="sampler 'heun' has no option 'steps'; did you mean 'num_steps'?"):
        make_sampler("heun", steps=3)
    with pytest.raises(DfmkitError, match="sampler 'heun': 'num_steps' must be from 1 to 100000"):
        make_sampler("heun", num_steps=0)
    with pytest.raises(DfmkitError, match="unknown sampler 'huen'; did you mean 'heun'"):
        make_sampler("huen")


# -- (a) moments -----------------------------------------------------------------------------


@objectives
@pytest.mark.parametrize(
    ("name", "steps", "var_tol"),
    [("heun", 35, 0.035), ("heun", 140, 0.004), ("euler", 500, 0.02)],
)
@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
def test_sampling_the_exact_denoiser_reproduces_mean_and_variance(objective, name, steps, var_tol, data):
    x = make_sampler(name, num_steps=steps).sample(data.denoiser(objective), quantile_noise(), objective)
    assert x.dtype == torch.float64
    # EDM's prior N(0, sigma_max^2) ignores the data mean: a bias of about mean * std / sigma_max.
    assert float(x.mean()) == pytest.approx(data.mean, abs=0.01)
    assert float(x.var()) == pytest.approx(data.variance, rel=var_tol)
    if data is MIXTURE:  # the modes keep their weights
        nearest = ((x[:, None] - torch.tensor(data.means)) / torch.tensor(data.stds)).abs().argmin(1)
        weights = torch.bincount(nearest, minlength=3) / x.numel()
        assert weights.tolist() == pytest.approx(list(data.weights), abs=0.01)


@pytest.mark.parametrize(("objective", "s_max"), [(EDM(), 50.0), (RectifiedFlow(), 0.9)], ids=["edm", "rectified-flow"])
@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
def test_stochastic_churn_reproduces_mean_and_variance(objective, s_max, data):
    sampler = make_sampler("heun", num_steps=128, s_churn=40, s_min=0.01, s_max=s_max)
    n = 20_000
    noise = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sampler.sample(data.denoiser(objective), noise, objective, torch.Generator().manual_seed(1))
    std = math.sqrt(data.variance)
    assert float(x.mean()) == pytest.approx(data.mean, abs=4 * std / math.sqrt(n) + 0.005)
    assert float(x.var()) == pytest.approx(data.variance, rel=4 * math.sqrt(2 / n) + 0.01)


def test_churn_renoises_to_the_higher_level_and_stays_within_the_objectives_range():
    x0, n = GAUSSIAN.sample((200_000,), torch.Generator().manual_seed(0)), torch.randn(200_000, dtype=torch.float64)
    flow = RectifiedFlow()
    t, t_hat = torch.tensor(0.4, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    x = flow.corrupt(x0, t, n)
    x_hat = flow.renoise(x, t, t_hat, torch.randn(200_000, dtype=torch.float64))
    expected = flow.corrupt(x0, t_hat, torch.randn(200_000, dtype=torch.float64))  # the law of x at t_hat
    assert float(x_hat.mean()) == pytest.approx(float(expected.mean()), abs=0.01)
    assert float(x_hat.var()) == pytest.approx(float(expected.var()), rel=0.02)
    seen = []
    make_sampler("heun", num_steps=4, s_churn=100).sample(
        lambda x, t: seen.append(float(t)) or GAUSSIAN.denoise(x, t, flow.alpha(t)), torch.zeros(8), flow)
    assert max(seen) == 1.0  # the churn's t_hat = t (1 + gamma) is clamped to the largest time


@objectives
def test_churn_is_reproducible_from_the_generator(objective):
    noise = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoise = GAUSSIAN.denoiser(objective)
    churn = make_sampler("heun", num_steps=10, s_churn=20)
    a = churn.sample(denoise, noise, objective, torch.Generator().manual_seed(5))
    b = churn.sample(denoise, noise, objective, torch.Generator().manual_seed(5))
    c = churn.sample(denoise, noise, objective, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = make_sampler("heun", num_steps=10)
    assert torch.equal(plain.sample(denoise, noise, objective, torch.Generator().manual_seed(5)),
                       plain.sample(denoise, noise, objective))  # s_churn = 0 draws nothing


# -- (b) convergence order -------------------------------------------------------------------


@objectives
def test_heun_corrects_at_the_euler_prediction(objective):
    """Evaluations at sigma_0, then (sigma_1 at x_next), (sigma_1 at the new point), ...: 2N - 1 in all."""
    calls = []
    denoise = GAUSSIAN.denoiser(objective)

    def recording(x, sigma):
        calls.append((float(sigma), x.clone()))
        return denoise(x, sigma)

    sampler = Heun(HeunOptions(num_steps=5))
    sampler.sample(recording, torch.ones(3, dtype=torch.float64), objective)
    sigmas = objective.sampling_sigmas(5).tolist()
    assert [s for s, _ in calls] == [sigmas[0], sigmas[1], sigmas[1], sigmas[2], sigmas[2], sigmas[3], sigmas[3],
                                     sigmas[4], sigmas[4]]
    assert len(calls) == sampler.num_evaluations == 9
    # The correction's input is the Euler prediction, not the point the step started from.
    x0 = torch.ones(3, dtype=torch.float64) * sigmas[0]
    euler = x0 + (sigmas[1] - sigmas[0]) * (x0 - denoise(x0, torch.tensor(sigmas[0]))) / sigmas[0]
    torch.testing.assert_close(calls[1][1], euler)


@objectives
@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
def test_heun_is_second_order(objective, data):
    errors, orders = convergence_order(lambda n: make_sampler("heun", num_steps=n), data, objective,
                                       steps=(16, 32, 64))
    assert min(orders) >= 1.8, (errors, orders)
    assert errors[2] < 1e-2


@objectives
def test_euler_is_first_order(objective):
    _, orders = convergence_order(lambda n: make_sampler("euler", num_steps=n), GAUSSIAN, objective,
                                  steps=(16, 32, 64))
    assert all(0.8 <= order <= 1.3 for order in orders), orders
    heun = lambda n: make_sampler("heun", num_steps=n)  # noqa: E731  (a fine solution of the same ODE)
    _, orders = convergence_order(lambda n: make_sampler("euler", num_steps=n), MIXTURE, objective,
                                  steps=(64, 128, 256), reference_steps=512, make_reference=heun)
    assert all(0.8 <= order <= 1.3 for order in orders), orders


def test_heun_converges_to_the_exact_flow_at_4x_per_doubling_under_edm():
    """For one Gaussian the ODE solution is known: the errors against it shrink about 4x per doubling."""
    z = torch.randn(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Every EDM sampler ends with x = D(x; sigma_min) (the step to sigma = 0).
    exact = GAUSSIAN.denoise(GAUSSIAN.flow(80.0 * z, 80.0, 0.002), 0.002)
    edm = EDM()
    errors = [float((make_sampler("heun", num_steps=n).sample(GAUSSIAN.denoise, z, edm) - exact).abs().max())
              for n in (32, 64, 128, 256)]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.5 < r < 4.6 for r in ratios), (errors, ratios)
    euler = [float((make_sampler("euler", num_steps=n).sample(GAUSSIAN.denoise, z, edm) - exact).abs().max())
             for n in (32, 64)]
    assert 1.8 < euler[0] / euler[1] < 2.3


@pytest.mark.parametrize("sample_shift", [1.0, 3.0])
def test_rectified_flow_ode_is_solved_at_2x_euler_and_4x_heun_per_doubling(sample_shift):
    """x_t = (1 - t) x0 + t eps for one Gaussian and for a mixture: Euler's error against the exact solution (one
    Gaussian) or a very fine Heun solution (the mixture) falls 2x per doubling of the steps, Heun's 4x."""
    flow = RectifiedFlow(sample_shift=sample_shift)
    z = torch.randn(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = GAUSSIAN.flow(z, 1.0, 0.0, flow.alpha)  # the starting point at t = 1 is pure noise
    assert torch.allclose(exact, 0.3 + 0.7 * z)

    def error(name, n, data=GAUSSIAN, target=exact):
        return float((make_sampler(name, num_steps=n).sample(data.denoiser(flow), z, flow) - target).abs().max())

    heun = [error("heun", n) for n in (16, 32, 64, 128)]
    euler = [error("euler", n) for n in (32, 64, 128)]
    assert all(3.5 < a / b < 4.6 for a, b in zip(heun, heun[1:])), heun
    assert all(1.8 < a / b < 2.3 for a, b in zip(euler, euler[1:])), euler
    fine = make_sampler("heun", num_steps=2048).sample(MIXTURE.denoiser(flow), z, flow)
    heun = [error("heun", n, MIXTURE, fine) for n in (32, 64, 128)]
    euler = [error("euler", n, MIXTURE, fine) for n in (64, 128, 256)]
    assert all(3.3 < a / b < 4.8 for a, b in zip(heun, heun[1:])), heun
    assert all(1.7 < a / b < 2.4 for a, b in zip(euler, euler[1:])), euler


# -- guidance on packed sequences ------------------------------------------------------------


def text_mean_gaussian(objective, std: float):
    """A raw network whose denoiser under ``objective`` is exact for data N(m_i, std^2), m_i the mean of sample i's
    text (0 if null)."""
    forwards = []

    def net(x_in, c_noise, batch):
        forwards.append(batch.num_samples)
        ids = batch.token_sample_ids()
        text_ids = torch.repeat_interleave(torch.arange(batch.num_samples), batch.seqlens_kv.long())
        m = torch.zeros(batch.num_samples, dtype=torch.float64).index_add_(0, text_ids, batch.text.double().mean(-1))
        mu = (m / batch.seqlens_kv.double())[ids].unsqueeze(-1)
        if isinstance(objective, EDM):
            sigma = (4 * c_noise.double()).exp()[ids].unsqueeze(-1)
            x = x_in.double() / objective.c_in(sigma)
        else:  # rectified flow: the network sees x_t and c_noise = time_scale t, and predicts (x_t - D) / t
            sigma = (c_noise.double() / objective.options.time_scale)[ids].unsqueeze(-1)
            x = x_in.double()
        a = objective.alpha(sigma)
        d = mu + a * std**2 / (a**2 * std**2 + sigma**2) * (x - a * mu)
        if isinstance(objective, EDM):
            return ((d - objective.c_skip(sigma) * x) / objective.c_out(sigma)).to(x_in.dtype)
        return ((x - d) / sigma).to(x_in.dtype)

    return net, forwards


def prompt_pack(means):
    batch = make_pack([(16, 14), (30, 16), (6, 6)], pad_multiple=16, text_lengths=[3, 5, 2])  # 56, 120, 9 tokens
    rows = torch.repeat_interleave(torch.tensor(means), batch.seqlens_kv.long())
    batch.text = rows.unsqueeze(-1).expand(-1, batch.text.shape[1]).float().contiguous()
    return batch


@objectives
def test_guidance_is_one_batched_forward_with_the_cfg_formula(objective):
    batch = prompt_pack([1.0, -0.5, 2.0])
    net, forwards = text_mean_gaussian(objective, 0.5)
    x = torch.randn(batch.latents.shape, dtype=torch.float64)
    sigma = torch.tensor(0.6, dtype=torch.float64)

    d = guided_denoiser(net, objective, batch, guidance=3.0)(x, sigma)
    assert forwards == [6]  # conditional and unconditional rows together
    cond = objective.denoise(net, x, sigma.expand(3), batch, torch.float32)  # the network sees the batch's dtype
    uncond = objective.denoise(net, x, sigma.expand(3), null_text(batch), torch.float32)
    real = batch.token_mask().unsqueeze(-1)
    torch.testing.assert_close(d, torch.where(real, uncond + 3.0 * (cond - uncond), 0))

    forwards.clear()
    plain = guided_denoiser(net, objective, batch, guidance=1.0)(x, sigma)
    assert forwards == [3]  # w = 1: no unconditional rows
    torch.testing.assert_close(plain, torch.where(real, cond, 0))


def null_text(batch):
    from dfmkit.diffusion import drop_condition

    return drop_condition(batch, torch.zeros(batch.num_samples, dtype=torch.bool))


@objectives
@pytest.mark.parametrize("w", [1.0, 2.5])
@pytest.mark.parametrize("name", ["heun", "euler"])
def test_guided_sampling_of_several_prompts_and_sizes_in_one_pack(objective, name, w):
    """Guiding exact Gaussian denoisers gives N(m_u + w (m_c - m_u), std^2) per sample; m_u = 0 here."""
    std, means = 0.5, [1.0, -0.5, 2.0]
    batch = prompt_pack(means)
    net, forwards = text_mean_gaussian(objective, std)
    sampler = make_sampler(name, num_steps=140 if name == "heun" else 500)
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(0))
    x = sampler.sample(guided_denoiser(net, objective, batch, guidance=w), noise, objective)
    assert len(forwards) == sampler.num_evaluations and set(forwards) == {3 if w == 1.0 else 6}
    real = batch.token_mask()
    assert float(x[~real].abs().max()) < 1e-9  # padding decays to zero
    for i, m in enumerate(means):
        sample = x[batch.token_sample_ids() == i][real[batch.token_sample_ids() == i]]
        n = sample.numel()
        assert float(sample.mean()) == pytest.approx(w * m, abs=4 * std / math.sqrt(n) + 0.02 * abs(w * m))
        assert float(sample.std()) == pytest.approx(std, rel=4 * math.sqrt(0.5 / n) + 0.02)


def test_guidance_scale_mapping_and_warnings():
    assert from_reference_scale(7.0) == 8.0  # reference D_c + g (D_c - D_u) with g = 7
    batch = prompt_pack([1.0, 0.0, 0.0])
    net, _ = text_mean_gaussian(EDM(), 0.5)
    with pytest.warns(UserWarning, match="condition_dropout = 0"):
        guided_denoiser(net, EDM(condition_dropout=0.0), batch, guidance=8.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guided_denoiser(net, EDM(condition_dropout=0.0), batch, guidance=1.0)
        guided_denoiser(net, EDM(condition_dropout=0.2), batch, guidance=8.0)
        warn_if_unguidable(1.0, 0.0)
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        guided_denoiser(net, EDM(), batch, guidance=float("nan"))


@objectives
def test_model_dtype_in_sampling(objective):
    batch = prompt_pack([1.0, 0.0, 0.0])
    seen = []

    def net(x_in, c_noise, b):
        seen.append(x_in.dtype)
        return torch.zeros_like(x_in)

    x = make_sampler("euler", num_steps=3).sample(guided_denoiser(net, objective, batch, 2.0, torch.bfloat16),
                                                  torch.randn(batch.latents.shape), objective)
    assert set(seen) == {torch.bfloat16} and x.dtype == torch.float64
