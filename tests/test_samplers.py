"""EDM samplers against data with an exact denoiser: moments, convergence order, guidance on packed sequences."""

from __future__ import annotations

import math
import tomllib
import warnings

import pytest
import torch

from dfmkit.components.samplers import HeunOptions, make_sampler
from dfmkit.components.samplers.edm import EDMEuler, EDMHeun, Sampler, karras_sigmas
from dfmkit.diffusion import EDM, from_reference_scale, guided_denoiser, warn_if_unguidable
from dfmkit.diffusion.analytic import GaussianMixture, convergence_order
from dfmkit.errors import DfmkitError, RecipeError
from dfmkit.plugins import PluginManager
from dfmkit.recipe import dump_recipe, load_recipe
from toys import TOY_SECTIONS, ToyComponents
from test_edm import make_pack

GAUSSIAN = GaussianMixture.gaussian(0.3, 0.7)
MIXTURE = GaussianMixture(means=(-1.0, 0.5, 2.0), stds=(0.3, 0.2, 0.5), weights=(0.3, 0.5, 0.2))


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(sigma_min=80.0), "'sigma_min' must be less than sigma_max, got 80.0 >= 80.0"),
        (dict(sigma_min=1.0, sigma_max=0.5), "'sigma_min' must be less than sigma_max"),
        (dict(num_steps=0), "'num_steps' must be at least 1, got 0"),
        (dict(sigma_min=-0.1), "'sigma_min' must be a finite number > 0, got -0.1"),
        (dict(rho=float("nan")), "'rho' must be a finite number > 0"),
        (dict(s_churn=-1.0), "'s_churn' must be a finite number >= 0"),
        (dict(s_min=2.0, s_max=1.0), "'s_min' must not exceed s_max"),
    ],
)
def test_bad_options_are_clear(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        HeunOptions(**options)


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
    assert default.sampler.name == "edm-heun" and default.sampler.options == HeunOptions()

    bad = {"sampler": {"name": "edm-euler", "num_step": 10, "s_churn": 1.0, "sigma_min": 90.0}}
    with pytest.raises(RecipeError) as info:
        load_recipe({**TOY_SECTIONS, **bad}, registries=registries)
    assert set(info.value.problems) == {
        "sampler.num_step: unknown key; did you mean sampler.num_steps?",
        "sampler.s_churn: unknown key; known keys: name, num_steps, sigma_min, sigma_max, rho",
        "sampler.sigma_min: must be less than sigma_max, got 90.0 >= 80.0",  # reported with them, not after
    }
    with pytest.raises(RecipeError) as info:
        load_recipe({**TOY_SECTIONS, "sampler": {"name": "edm-heun", "sigma_min": 90.0}}, registries=registries)
    assert info.value.problems == ["sampler.sigma_min: must be less than sigma_max, got 90.0 >= 80.0"]
    with pytest.raises(RecipeError, match="sampler.num_steps: must be at least 1, got 0"):
        load_recipe({**TOY_SECTIONS, "sampler": {"name": "edm-heun"}}, ["sampler.num_steps=0"], registries=registries)


def test_make_sampler():
    sampler = make_sampler("edm-euler", num_steps=7)
    assert isinstance(sampler, EDMEuler) and isinstance(sampler, Sampler) and sampler.num_evaluations == 7
    assert make_sampler(num_steps=7).num_evaluations == 13
    with pytest.raises(DfmkitError, match="sampler 'edm-heun' has no option 'steps'; did you mean 'num_steps'?"):
        make_sampler("edm-heun", steps=3)
    with pytest.raises(DfmkitError, match="sampler 'edm-heun': 'num_steps' must be at least 1"):
        make_sampler("edm-heun", num_steps=0)
    with pytest.raises(DfmkitError, match="unknown sampler 'edm-huen'; did you mean 'edm-heun'"):
        make_sampler("edm-huen")


# -- (a) moments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "steps", "var_tol"),
    [("edm-heun", 35, 0.035), ("edm-heun", 140, 0.004), ("edm-euler", 500, 0.02)],
)
@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
def test_sampling_the_exact_denoiser_reproduces_mean_and_variance(name, steps, var_tol, data):
    x = make_sampler(name, num_steps=steps).sample(data.denoise, quantile_noise())
    assert x.dtype == torch.float64
    # The prior N(0, sigma_max^2) ignores the data mean: a bias of about mean * std / sigma_max.
    assert float(x.mean()) == pytest.approx(data.mean, abs=0.01)
    assert float(x.var()) == pytest.approx(data.variance, rel=var_tol)
    if data is MIXTURE:  # the modes keep their weights
        nearest = ((x[:, None] - torch.tensor(data.means)) / torch.tensor(data.stds)).abs().argmin(1)
        weights = torch.bincount(nearest, minlength=3) / x.numel()
        assert weights.tolist() == pytest.approx(list(data.weights), abs=0.01)


@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
def test_stochastic_churn_reproduces_mean_and_variance(data):
    sampler = make_sampler("edm-heun", num_steps=128, s_churn=40, s_min=0.05, s_max=50)
    n = 20_000
    noise = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sampler.sample(data.denoise, noise, torch.Generator().manual_seed(1))
    std = math.sqrt(data.variance)
    assert float(x.mean()) == pytest.approx(data.mean, abs=4 * std / math.sqrt(n) + 0.005)
    assert float(x.var()) == pytest.approx(data.variance, rel=4 * math.sqrt(2 / n) + 0.01)


def test_churn_is_reproducible_from_the_generator():
    noise = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    churn = make_sampler("edm-heun", num_steps=10, s_churn=20)
    a = churn.sample(GAUSSIAN.denoise, noise, torch.Generator().manual_seed(5))
    b = churn.sample(GAUSSIAN.denoise, noise, torch.Generator().manual_seed(5))
    c = churn.sample(GAUSSIAN.denoise, noise, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = make_sampler("edm-heun", num_steps=10)
    assert torch.equal(plain.sample(GAUSSIAN.denoise, noise, torch.Generator().manual_seed(5)),
                       plain.sample(GAUSSIAN.denoise, noise))  # s_churn = 0 draws nothing


# -- (b) convergence order -------------------------------------------------------------------


def test_heun_corrects_at_the_euler_prediction():
    """Evaluations at sigma_0, then (sigma_1 at x_next), (sigma_1 at the new point), ...: 2N - 1 in all."""
    calls = []

    def recording(x, sigma):
        calls.append((float(sigma), x.clone()))
        return GAUSSIAN.denoise(x, sigma)

    sampler = EDMHeun(HeunOptions(num_steps=5))
    sampler.sample(recording, torch.ones(3, dtype=torch.float64))
    sigmas = sampler.sigmas().tolist()
    assert [s for s, _ in calls] == [sigmas[0], sigmas[1], sigmas[1], sigmas[2], sigmas[2], sigmas[3], sigmas[3],
                                     sigmas[4], sigmas[4]]
    assert len(calls) == sampler.num_evaluations == 9
    # The correction's input is the Euler prediction, not the point the step started from.
    x0 = torch.ones(3, dtype=torch.float64) * sigmas[0]
    euler = x0 + (sigmas[1] - sigmas[0]) * (x0 - GAUSSIAN.denoise(x0, sigmas[0])) / sigmas[0]
    torch.testing.assert_close(calls[1][1], euler)


@pytest.mark.parametrize("data", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
def test_heun_is_second_order(data):
    errors, orders = convergence_order(lambda n: make_sampler("edm-heun", num_steps=n), data, steps=(16, 32, 64))
    assert min(orders) >= 1.8, (errors, orders)
    assert errors[2] < 1e-2


def test_euler_is_first_order():
    _, orders = convergence_order(lambda n: make_sampler("edm-euler", num_steps=n), GAUSSIAN, steps=(16, 32, 64))
    assert all(0.8 <= order <= 1.3 for order in orders), orders
    heun = lambda n: make_sampler("edm-heun", num_steps=n)  # noqa: E731  (a fine solution of the same ODE)
    _, orders = convergence_order(lambda n: make_sampler("edm-euler", num_steps=n), MIXTURE, steps=(64, 128, 256),
                                  reference_steps=512, make_reference=heun)
    assert all(0.8 <= order <= 1.3 for order in orders), orders


def test_heun_converges_to_the_exact_flow_at_4x_per_doubling():
    """For one Gaussian the ODE solution is known: the errors against it shrink about 4x per doubling."""
    z = torch.randn(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Every EDM sampler ends with x = D(x; sigma_min) (the step to sigma = 0).
    exact = GAUSSIAN.denoise(GAUSSIAN.flow(80.0 * z, 80.0, 0.002), 0.002)
    errors = [float((make_sampler("edm-heun", num_steps=n).sample(GAUSSIAN.denoise, z) - exact).abs().max())
              for n in (32, 64, 128, 256)]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.5 < r < 4.6 for r in ratios), (errors, ratios)
    euler = [float((make_sampler("edm-euler", num_steps=n).sample(GAUSSIAN.denoise, z) - exact).abs().max())
             for n in (32, 64)]
    assert 1.8 < euler[0] / euler[1] < 2.3


# -- guidance on packed sequences ------------------------------------------------------------


def text_mean_gaussian(edm: EDM, std: float):
    """A raw network whose denoiser is exact for data N(m_i, std^2), m_i the mean of sample i's text (0 if null)."""
    forwards = []

    def net(x_in, c_noise, batch):
        forwards.append(batch.num_samples)
        ids = batch.token_sample_ids()
        text_ids = torch.repeat_interleave(torch.arange(batch.num_samples), batch.seqlens_kv.long())
        m = torch.zeros(batch.num_samples, dtype=torch.float64).index_add_(0, text_ids, batch.text.double().mean(-1))
        mu = (m / batch.seqlens_kv.double())[ids].unsqueeze(-1)
        sigma = (4 * c_noise.double()).exp()[ids].unsqueeze(-1)
        x = x_in.double() / edm.c_in(sigma)
        d = mu + std**2 / (std**2 + sigma**2) * (x - mu)
        return ((d - edm.c_skip(sigma) * x) / edm.c_out(sigma)).to(x_in.dtype)

    return net, forwards


def prompt_pack(means):
    batch = make_pack([(16, 14), (30, 16), (6, 6)], pad_multiple=16, text_lengths=[3, 5, 2])  # 56, 120, 9 tokens
    rows = torch.repeat_interleave(torch.tensor(means), batch.seqlens_kv.long())
    batch.text = rows.unsqueeze(-1).expand(-1, batch.text.shape[1]).float().contiguous()
    return batch


def test_guidance_is_one_batched_forward_with_the_cfg_formula():
    edm = EDM()
    batch = prompt_pack([1.0, -0.5, 2.0])
    net, forwards = text_mean_gaussian(edm, 0.5)
    x = torch.randn(batch.latents.shape, dtype=torch.float64)
    sigma = torch.tensor(1.3, dtype=torch.float64)

    d = guided_denoiser(net, edm, batch, guidance=3.0)(x, sigma)
    assert forwards == [6]  # conditional and unconditional rows together
    cond = edm.denoise(net, x, sigma.expand(3), batch)
    uncond = edm.denoise(net, x, sigma.expand(3), edm_null(batch))
    real = batch.token_mask().unsqueeze(-1)
    torch.testing.assert_close(d, torch.where(real, uncond + 3.0 * (cond - uncond), 0))

    forwards.clear()
    plain = guided_denoiser(net, edm, batch, guidance=1.0)(x, sigma)
    assert forwards == [3]  # w = 1: no unconditional rows
    torch.testing.assert_close(plain, torch.where(real, cond, 0))


def edm_null(batch):
    from dfmkit.diffusion import drop_condition

    return drop_condition(batch, torch.zeros(batch.num_samples, dtype=torch.bool))


@pytest.mark.parametrize("w", [1.0, 2.5])
@pytest.mark.parametrize("name", ["edm-heun", "edm-euler"])
def test_guided_sampling_of_several_prompts_and_sizes_in_one_pack(name, w):
    """Guiding exact Gaussian denoisers gives N(m_u + w (m_c - m_u), std^2) per sample; m_u = 0 here."""
    edm, std, means = EDM(), 0.5, [1.0, -0.5, 2.0]
    batch = prompt_pack(means)
    net, forwards = text_mean_gaussian(edm, std)
    sampler = make_sampler(name, num_steps=140 if name == "edm-heun" else 500)
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(0))
    x = sampler.sample(guided_denoiser(net, edm, batch, guidance=w), noise)
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


def test_model_dtype_in_sampling():
    edm = EDM()
    batch = prompt_pack([1.0, 0.0, 0.0])
    seen = []

    def net(x_in, c_noise, b):
        seen.append(x_in.dtype)
        return torch.zeros_like(x_in)

    x = make_sampler("edm-euler", num_steps=3).sample(guided_denoiser(net, edm, batch, 2.0, torch.bfloat16),
                                                      torch.randn(batch.latents.shape))
    assert set(seen) == {torch.bfloat16} and x.dtype == torch.float64
