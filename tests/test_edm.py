"""EDM training: preconditioning, per-sample noise draws on packed batches, and the loss against its analytic value."""

from __future__ import annotations

import dataclasses
import math

import attrs
import numpy as np
import pytest
import torch

from dfmkit.batch import PackedBatch, Sample, pack
from dfmkit.components.objectives.edm import EDM
from dfmkit.diffusion import LossTerms, drop_condition
from dfmkit.diffusion.analytic import GaussianMixture
from dfmkit.diffusion.objective import ModelFn, loss_share
from dfmkit.job import Job
from dfmkit.recipe import load_recipe
from toys import TOY_SECTIONS

TEXT_DIM = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def make_pack(sizes, channels=4, patch=2, pad_multiple=1, seed=0, text_lengths=None) -> PackedBatch:
    """Single-frame samples of ``h x w`` latent pixels; ``text_lengths`` tokens of text each."""
    g = torch.Generator().manual_seed(seed)
    text_lengths = text_lengths or [3 + i for i in range(len(sizes))]
    samples = [
        Sample(latent=torch.randn(channels, 1, h, w, generator=g), text=torch.randn(n, TEXT_DIM, generator=g) + 1,
               key=f"s{i}")
        for i, ((h, w), n) in enumerate(zip(sizes, text_lengths))
    ]
    return pack(samples, patch_spatial=patch, pad_multiple=pad_multiple)


def with_latents(batch: PackedBatch, latents: torch.Tensor) -> PackedBatch:
    return dataclasses.replace(batch, latents=latents)


def exact_network(data: GaussianMixture, edm: EDM) -> ModelFn:
    """The raw network ``F`` whose EDM-preconditioned denoiser is exactly ``data.denoise``.

    Each sample's sigma is recovered from ``c_noise = ln(sigma) / 4`` (float32: to about 1e-6).
    """

    def model(x_in: torch.Tensor, c_noise: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        sigma = (4 * c_noise.to(torch.float64)).exp()[batch.token_sample_ids()].unsqueeze(-1)
        x = x_in.to(torch.float64) / edm.c_in(sigma)
        return ((data.denoise(x, sigma) - edm.c_skip(sigma) * x) / edm.c_out(sigma)).to(x_in.dtype)

    return model


def mean_loss(terms: LossTerms, normalization: str = "sample") -> torch.Tensor:
    """The loss of one process's batch: its share's total over its count."""
    share = loss_share(terms, normalization)
    return share.total / share.count


# -- preconditioning -------------------------------------------------------------------------


def test_preconditioning_matches_the_paper():
    edm = EDM()
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    sd = 0.5
    for s, c_skip, c_out, c_in, c_noise, lam in zip(
        sigma, edm.c_skip(sigma), edm.c_out(sigma), edm.c_in(sigma), edm.c_noise(sigma), edm.loss_weight(sigma)
    ):
        s = float(s)
        assert float(c_skip) == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-12)
        assert float(c_out) == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert float(c_in) == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert float(c_noise) == pytest.approx(math.log(s) / 4, rel=1e-12)
        assert float(lam) == pytest.approx((s**2 + sd**2) / (s * sd) ** 2, rel=1e-12)
        assert float(lam) == pytest.approx(1 / float(c_out) ** 2, rel=1e-12)  # unit effective weight on F


def test_denoise_with_zero_network_is_the_skip_path_and_gets_per_sample_sigma():
    edm = EDM(sigma_data=0.5)
    batch = make_pack([(4, 4), (8, 4)], pad_multiple=8)
    sigma = torch.tensor([0.3, 7.0])
    seen = {}

    def zero_net(x_in, c_noise, b):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return torch.zeros_like(x_in)

    x = torch.randn_like(batch.latents)
    d = edm.denoise(zero_net, x, sigma, batch)
    per_token_sigma = sigma[batch.token_sample_ids()].unsqueeze(-1)
    torch.testing.assert_close(d, edm.c_skip(per_token_sigma) * x)
    torch.testing.assert_close(seen["x_in"], x / (per_token_sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(seen["c_noise"], sigma.log() / 4)


def test_the_recipe_builds_edm_by_default_and_the_reference_noise_levels():
    registries = _toy_registries()
    default = Job(load_recipe(TOY_SECTIONS, registries=registries), _toy_plugins()).components["diffusion"].build()
    assert default == EDM(sigma_data=0.5, p_mean=-1.2, p_std=1.2, condition_dropout=0.2)
    recipe = load_recipe(
        {**TOY_SECTIONS, "diffusion": {"p_mean": 0.0, "p_std": 1.0, "loss_normalization": "token"}},
        registries=registries,
    )
    edm = Job(recipe, _toy_plugins()).components["diffusion"].build()
    assert (edm.options.p_mean, edm.options.p_std, edm.loss_normalization) == (0.0, 1.0, "token")
    with pytest.raises(ValueError, match="sigma_data"):
        EDM(sigma_data=0)
    with pytest.raises(ValueError, match="loss_normalization"):
        EDM(loss_normalization="pixel")


def _toy_plugins():
    from dfmkit.plugins import PluginManager
    from toys import ToyComponents

    return PluginManager(entry_points=False, extra=[(ToyComponents(), "toy-dist 1.0")])


def _toy_registries():
    return _toy_plugins().registries


# -- draws -----------------------------------------------------------------------------------


def test_every_sample_of_a_pack_gets_its_own_sigma_noise_and_dropout():
    edm = EDM(condition_dropout=0.5)
    batch = make_pack([(4, 4)] * 64, pad_multiple=8)
    draw = edm.draw(batch, torch.Generator().manual_seed(1))
    assert draw.sigma.shape == (64,) and draw.keep_text.shape == (64,) and draw.noise.shape == batch.latents.shape
    assert draw.sigma.unique().numel() == 64
    assert 10 < int(draw.keep_text.sum()) < 54  # both decisions occur within one pack
    assert torch.all(draw.noise[~batch.token_mask()] == 0)  # padding is not noised

    again = edm.draw(batch, torch.Generator().manual_seed(1))
    other = edm.draw(batch, torch.Generator().manual_seed(2))
    for field in ("sigma", "noise", "keep_text"):
        assert torch.equal(getattr(draw, field), getattr(again, field))
    assert not torch.equal(draw.sigma, other.sigma)


@pytest.mark.parametrize(("p_mean", "p_std"), [(-1.2, 1.2), (0.0, 1.0)])
def test_training_noise_levels_are_log_normal(p_mean, p_std):
    log_sigma = EDM(p_mean=p_mean, p_std=p_std).sample_sigma(torch.ones(200_000), torch.Generator().manual_seed(0)).log().double()
    assert float(log_sigma.mean()) == pytest.approx(p_mean, abs=4 * p_std / math.sqrt(200_000))
    assert float(log_sigma.std()) == pytest.approx(p_std, rel=0.01)


def test_condition_dropout_rate_and_null_text():
    batch = make_pack([(2, 2)] * 4000, channels=1, text_lengths=[1] * 4000)
    keep = EDM(condition_dropout=0.2).draw(batch, torch.Generator().manual_seed(0)).keep_text
    assert float(keep.float().mean()) == pytest.approx(0.8, abs=4 * math.sqrt(0.16 / 4000))
    assert EDM(condition_dropout=0.0).draw(batch).keep_text.all()
    assert not EDM(condition_dropout=1.0).draw(batch).keep_text.any()

    small = make_pack([(4, 4), (4, 4), (4, 4)], text_lengths=[2, 5, 3])
    dropped = drop_condition(small, torch.tensor([True, False, True]))
    rows = torch.split(dropped.text, small.seqlens_kv.tolist())
    original = torch.split(small.text, small.seqlens_kv.tolist())
    assert torch.equal(rows[0], original[0]) and torch.equal(rows[2], original[2])
    assert torch.all(rows[1] == 0) and torch.all(original[1] != 0)


# -- the loss --------------------------------------------------------------------------------


def exact_gaussian_loss(sigma, s, sigma_data):
    """lambda(sigma) times the per-element error of the exact denoiser for data N(mu, s^2)."""
    mse = s**2 * sigma**2 / (s**2 + sigma**2)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2 * mse


def test_denoising_mse_quadrature_matches_the_gaussian_closed_form():
    data = GaussianMixture.gaussian(0.3, 0.7)
    for sigma in (0.01, 0.3, 1.0, 20.0):
        assert data.denoising_mse(sigma) == pytest.approx(0.7**2 * sigma**2 / (0.7**2 + sigma**2), rel=1e-9)


def gaussian_pack(data: GaussianMixture, num_samples: int, h: int, w: int, seed: int, pad_multiple: int = 1):
    batch = make_pack([(h, w)] * num_samples, channels=4, pad_multiple=pad_multiple, seed=seed)
    x0 = data.sample(batch.latents.shape, torch.Generator().manual_seed(seed + 1), dtype=torch.float32)
    return with_latents(batch, x0 * batch.token_mask().unsqueeze(-1))


def test_loss_of_the_exact_denoiser_equals_its_analytic_value_given_sigma():
    """Per sample: mean over tokens of lambda (D* - x0)^2 -> lambda(sigma) s^2 sigma^2 / (s^2 + sigma^2)."""
    mu, s = 0.3, 0.7
    data = GaussianMixture.gaussian(mu, s)
    edm = EDM(sigma_data=0.5)
    batch = gaussian_pack(data, num_samples=64, h=32, w=32, seed=0)  # 256 tokens x 16 features each
    draw = edm.draw(batch, torch.Generator().manual_seed(3))
    terms = edm.loss_terms(exact_network(data, edm), batch, draw)
    assert torch.equal(terms.token_count, batch.seqlens.float())
    per_sample = (terms.sq_err_sum / terms.token_count).double()
    expected = exact_gaussian_loss(draw.sigma.double(), s, 0.5)
    # Each element's squared error is (posterior std)^2 chi^2_1: relative std sqrt(2 / elements).
    rel_std = math.sqrt(2 / (256 * 16))
    assert torch.all((per_sample / expected - 1).abs() < 5 * rel_std)
    pack_loss = float(mean_loss(terms))
    assert pack_loss == pytest.approx(float(expected.mean()), rel=5 * rel_std / math.sqrt(64))


def test_expected_training_loss_equals_the_integral_over_the_noise_distribution():
    """E_sigma[lambda(sigma) E|D* - x0|^2] by Gauss-Hermite over ln(sigma) vs the averaged training loss."""
    data = GaussianMixture(means=(-1.0, 0.5, 2.0), stds=(0.3, 0.2, 0.5), weights=(0.3, 0.5, 0.2))
    edm = EDM(sigma_data=0.5, p_mean=-1.2, p_std=1.2)
    z, gw = np.polynomial.hermite_e.hermegauss(64)
    gw = gw / math.sqrt(2 * math.pi)
    sigmas = np.exp(edm.options.p_mean + edm.options.p_std * z)
    lam = (sigmas**2 + 0.25) / (sigmas * 0.5) ** 2
    analytic = float(sum(w * weight * data.denoising_mse(s) for w, weight, s in zip(gw, lam, sigmas)))

    generator = torch.Generator().manual_seed(0)
    losses = []
    for seed in range(8):
        batch = gaussian_pack(data, num_samples=256, h=8, w=8, seed=10 + seed)
        losses.append(float(edm.loss(exact_network(data, edm), batch, generator)))
    # The spread comes mostly from sigma: 8 x 256 draws.
    assert np.mean(losses) == pytest.approx(analytic, rel=0.05)

    # And per noise level, against the quadrature value for the mixture.
    batch = gaussian_pack(data, num_samples=4, h=64, w=64, seed=99)
    fixed = attrs.evolve(edm.draw(batch, generator), sigma=torch.tensor([0.05, 0.3, 1.0, 5.0]))
    terms = edm.loss_terms(exact_network(data, edm), batch, fixed)
    for value, sigma in zip((terms.sq_err_sum / terms.token_count).tolist(), fixed.sigma.tolist()):
        lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        assert value == pytest.approx(lam * data.denoising_mse(sigma), rel=0.05)


def test_the_exact_denoiser_minimises_the_loss():
    data = GaussianMixture.gaussian(0.3, 0.7)
    edm = EDM()
    batch = gaussian_pack(data, num_samples=32, h=16, w=16, seed=4)
    draw = edm.draw(batch, torch.Generator().manual_seed(5))
    exact = exact_network(data, edm)
    best = float(mean_loss(edm.loss_terms(exact, batch, draw)))
    for scale in (0.9, 1.1):
        worse = mean_loss(edm.loss_terms(lambda x, c, b: exact(x, c, b) * scale, batch, draw))
        assert float(worse) > best


def test_sample_normalisation_weighs_samples_equally_and_token_normalisation_weighs_tokens():
    edm = EDM()
    terms = LossTerms(sq_err_sum=torch.tensor([2.0, 300.0]), token_count=torch.tensor([2.0, 100.0]))
    sample, token = loss_share(terms, "sample"), loss_share(terms, "token")
    assert (float(sample.total), float(sample.count)) == (1.0 + 3.0, 2.0)
    assert (float(token.total), float(token.count)) == (302.0, 102.0)
    empty = LossTerms(sq_err_sum=torch.tensor([2.0, 0.0]), token_count=torch.tensor([2.0, 0.0]))
    assert float(loss_share(empty, "sample").count) == 1.0  # a sample without real tokens does not count
    with pytest.raises(ValueError, match="loss normalization must be one of sample, token"):
        loss_share(terms, "pixel")

    # A 16-token image and a 1024-token video: per-sample loss 1 and 3 -> "sample" gives 2 whatever the sizes.
    batch = make_pack([(8, 8), (64, 64)])
    draw = edm.draw(batch, torch.Generator().manual_seed(0))
    target = torch.where(batch.token_sample_ids() == 0, 1.0, math.sqrt(3.0)).unsqueeze(-1)

    def off_by_target(x_in, c_noise, b):  # D - x0 = +-target / sqrt(lambda) on every element
        sigma = (4 * c_noise).exp()[b.token_sample_ids()].unsqueeze(-1)
        x = x_in / edm.c_in(sigma)
        d = b.latents + target / edm.loss_weight(sigma).sqrt()
        return (d - edm.c_skip(sigma) * x) / edm.c_out(sigma)

    terms = edm.loss_terms(off_by_target, batch, draw)
    assert float(mean_loss(terms, "sample")) == pytest.approx(2.0, rel=1e-4)
    assert float(mean_loss(terms, "token")) == pytest.approx((16 * 1 + 1024 * 3) / 1040, rel=1e-4)
    token_edm = EDM(loss_normalization="token")
    assert float(token_edm.loss(off_by_target, batch, torch.Generator().manual_seed(0))) == pytest.approx(
        (16 * 1 + 1024 * 3) / 1040, rel=1e-4)


def test_padding_never_contributes_to_the_loss_or_the_gradient():
    edm = EDM()
    batch = make_pack([(4, 6), (6, 6), (2, 2)], pad_multiple=16)
    pad = ~batch.token_mask()
    assert pad.sum() > 0
    draw = edm.draw(batch, torch.Generator().manual_seed(0))
    weight = torch.nn.Parameter(torch.tensor(0.5))

    def net(x_in, c_noise, b):
        out = weight * x_in
        return torch.where(pad.unsqueeze(-1), torch.nan, out)  # garbage on padding rows

    dirty = with_latents(batch, torch.where(pad.unsqueeze(-1), 1e6, batch.latents))
    loss = mean_loss(edm.loss_terms(net, dirty, draw))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(weight.grad)
    with torch.no_grad():
        clean = mean_loss(edm.loss_terms(lambda x, c, b: weight * x, batch, draw))
        assert float(loss) == pytest.approx(float(clean), rel=1e-6)


def test_draw_on_the_full_batch_then_shard_gives_the_same_sums_and_counts():
    """The trainer draws on the whole pack and gives each context-parallel rank its load-balanced shard of the pack
    and of the noise (dfmkit.parallel.shard_for_context_parallel): the ranks' per-sample sums and real-token counts
    add up to the whole pack's. (The loss across ranks: tests/test_parallel.py, against one process.)"""
    from dfmkit.parallel import shard_for_context_parallel

    edm = EDM()
    batch = make_pack([(4, 8), (8, 8), (2, 4)], pad_multiple=8)
    assert not batch.token_mask().all()  # padding tokens fall into the shards too
    draw = edm.draw(batch, torch.Generator().manual_seed(0))
    net = lambda x_in, c_noise, b: 0.7 * x_in + c_noise[b.token_sample_ids()].unsqueeze(-1)  # noqa: E731
    full = edm.loss_terms(net, batch, draw)
    shards = [shard_for_context_parallel(batch, draw.noise, _ContextRank(2, rank)) for rank in range(2)]
    terms = [edm.loss_terms(net, shard, attrs.evolve(draw, noise=noise)) for shard, noise in shards]
    torch.testing.assert_close(terms[0].sq_err_sum + terms[1].sq_err_sum, full.sq_err_sum)
    torch.testing.assert_close(terms[0].token_count + terms[1].token_count, full.token_count)
    assert all(0 < t.token_count.sum() < full.token_count.sum() for t in terms)

    with pytest.raises(Exception, match="context-parallel shard"):
        edm.loss_terms(net, shards[0][0], draw)  # the full batch's noise on a shard


@attrs.frozen
class _ContextRank:
    cp_size: int
    cp_rank: int


def test_model_dtype_is_what_the_network_sees():
    edm = EDM()
    batch = make_pack([(4, 4), (4, 4)])
    seen = []

    def net(x_in, c_noise, b):
        seen.append(x_in.dtype)
        return x_in

    loss = edm.loss(net, batch, torch.Generator().manual_seed(0), model_dtype=torch.bfloat16)
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)
