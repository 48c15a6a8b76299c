"""Objectives as components: rectified flow's training draws and loss against their analytic values, the recipe's
[diffusion] section, a toy objective added by a plugin, and the objective a checkpoint was trained with (kept on
resume and at generation). The samplers' convergence under each objective is in test_samplers.py, the parallel
parity under rectified flow in test_parallel.py."""

from __future__ import annotations

import json
import math

import attrs
import pytest
import torch

import dfmkit
from dfmkit.cli import main as cli_main
from dfmkit.components.objectives import EDMOptions, RectifiedFlowOptions, TrainingOptions
from dfmkit.components.objectives.rectified_flow import RectifiedFlow, shift_times
from dfmkit.diffusion.analytic import GaussianMixture
from dfmkit.diffusion.objective import Objective, Prediction, sample_levels
from dfmkit.errors import GenerateError, RecipeError
from dfmkit.hookspecs import hookimpl
from dfmkit.plugins import PluginManager
from dfmkit.recipe import load_recipe
from dfmkit.train import checkpoint as ckpt
from test_edm import make_pack
from test_generate_export import tiny_recipe
from toys import TOY_SECTIONS

pytestmark = pytest.mark.usefixtures("one_thread")


# -- rectified flow's training draws ----------------------------------------------------------


@pytest.mark.parametrize(("p_mean", "p_std"), [(0.0, 1.0), (-0.5, 1.6)])
def test_training_times_are_logit_normal(p_mean, p_std):
    t = RectifiedFlow(p_mean=p_mean, p_std=p_std).sample_sigma(torch.ones(200_000), torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and float(t.min()) > 0 and float(t.max()) < 1
    logit = torch.logit(t.double())
    assert float(logit.mean()) == pytest.approx(p_mean, abs=4 * p_std / math.sqrt(200_000))
    assert float(logit.std()) == pytest.approx(p_std, rel=0.01)


def test_a_fixed_shift_and_a_shift_that_grows_with_the_tokens():
    tokens = torch.tensor([256, 4096, 1024, 16])
    plain = RectifiedFlow().sample_sigma(tokens, torch.Generator().manual_seed(3))
    fixed = RectifiedFlow(shift=3.0).sample_sigma(tokens, torch.Generator().manual_seed(3))
    torch.testing.assert_close(fixed, 3 * plain / (1 + 2 * plain))
    by_tokens = RectifiedFlow(shift_by_tokens=True).sample_sigma(tokens, torch.Generator().manual_seed(3))
    mu = 0.5 + (1.15 - 0.5) * (tokens.float() - 256) / (4096 - 256)  # Flux's line through (256, 0.5), (4096, 1.15)
    torch.testing.assert_close(by_tokens, shift_times(plain, mu.exp()))
    assert float(by_tokens[1] / plain[1]) > float(by_tokens[0] / plain[0])  # more tokens: more noise
    assert float(shift_times(torch.tensor(0.0), 4.0)) == 0 and float(shift_times(torch.tensor(1.0), 4.0)) == 1


def test_every_sample_of_a_pack_gets_its_own_time_by_its_own_token_count():
    flow = RectifiedFlow(shift_by_tokens=True, condition_dropout=0.5)
    batch = make_pack([(4, 4)] * 32 + [(16, 16)] * 32, pad_multiple=8)  # 4 and 64 tokens a sample
    draw = flow.draw(batch, torch.Generator().manual_seed(1))
    assert draw.sigma.shape == (64,) and draw.sigma.unique().numel() == 64
    assert float(draw.sigma.min()) > 0 and float(draw.sigma.max()) < 1
    assert torch.all(draw.noise[~batch.token_mask()] == 0)
    again = flow.draw(batch, torch.Generator().manual_seed(1))
    assert torch.equal(draw.sigma, again.sigma) and torch.equal(draw.noise, again.noise)
    # The same draws with the shift of each sample's own size: the bigger samples sit at more noise.
    expected = flow.sample_sigma(batch.seqlens, torch.Generator().manual_seed(1))
    torch.testing.assert_close(draw.sigma, expected)


# -- rectified flow's model call and loss -----------------------------------------------------


def exact_velocity(data: GaussianMixture, flow: RectifiedFlow):
    """The raw network v(x_t, c_noise) whose rectified-flow denoiser x_t - t v is exactly ``data``'s E[x0 | x_t]."""

    def model(x, c_noise, batch):
        t = (c_noise.double() / flow.options.time_scale)[batch.token_sample_ids()].unsqueeze(-1)
        x = x.double()
        return ((x - data.denoise(x, t, 1 - t)) / t).to(torch.float32)

    return model


def test_the_network_sees_x_t_and_scaled_time_and_predicts_the_velocity():
    flow = RectifiedFlow(time_scale=500.0)
    batch = make_pack([(4, 4), (6, 6), (2, 2)], pad_multiple=4)
    seen = {}

    def net(x, c_noise, b):
        seen.update(x=x, c_noise=c_noise)
        return torch.full_like(x, 2.0)

    t = torch.tensor([0.2, 0.5, 0.9])
    x = torch.randn(batch.latents.shape)
    d = flow.denoise(net, x, t, batch)
    per_token = t[batch.token_sample_ids()].unsqueeze(-1)
    torch.testing.assert_close(d, x - per_token * 2.0)  # D = x_t - t v
    assert torch.equal(seen["x"], x) and torch.equal(seen["c_noise"], 500.0 * t)
    x, d, per_token = x.double(), flow.denoise(net, x.double(), t.double(), batch), per_token.double()
    torch.testing.assert_close(flow.velocity(x, per_token, d), torch.full_like(x, 2.0))  # the ODE is v itself


def test_the_loss_is_the_velocity_error_per_sample_and_padding_never_counts():
    flow = RectifiedFlow()
    batch = make_pack([(4, 4), (8, 8)], pad_multiple=8)
    draw = flow.draw(batch, torch.Generator().manual_seed(2))
    prediction = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(9))
    prediction[~batch.token_mask()] = float("nan")  # padding may hold anything
    terms = flow.loss_terms(lambda x, c, b: prediction, batch, draw)
    target = draw.noise - batch.latents  # v = eps - x0
    for i, (start, n) in enumerate(zip(batch.cu_seqlens.tolist(), batch.seqlens.tolist())):
        expected = (prediction[start:start + n] - target[start:start + n]).square().mean(-1).sum()
        torch.testing.assert_close(terms.sq_err_sum[i], expected)
        assert float(terms.token_count[i]) == n
    # x_t = (1 - t) x0 + t eps is what the network was given
    seen = []
    flow.loss_terms(lambda x, c, b: seen.append(x) or x, batch, draw)
    t = draw.sigma[batch.token_sample_ids()].unsqueeze(-1)
    torch.testing.assert_close(seen[0], (1 - t) * batch.latents + t * draw.noise)


def test_loss_of_the_exact_velocity_equals_its_analytic_value():
    """With the exact E[x0 | x_t], the velocity error is |D - x0|^2 / t^2: its mean over the data and noise is the
    denoising error at t (Gauss-Hermite) over t^2."""
    data = GaussianMixture(means=(-1.0, 0.5, 2.0), stds=(0.3, 0.2, 0.5), weights=(0.3, 0.5, 0.2))
    flow = RectifiedFlow()
    batch = make_pack([(64, 64)] * 4, channels=4)
    batch.latents = data.sample(batch.latents.shape, torch.Generator().manual_seed(0)).float()
    times = torch.tensor([0.1, 0.3, 0.6, 0.9])
    draw = attrs.evolve(flow.draw(batch, torch.Generator().manual_seed(1)), sigma=times,
                        keep_text=torch.ones(4, dtype=torch.bool))
    terms = flow.loss_terms(exact_velocity(data, flow), batch, draw)
    per_sample = terms.sq_err_sum / terms.token_count
    for t, loss in zip(times.tolist(), per_sample.tolist()):
        analytic = data.denoising_mse(t, alpha=1 - t) / t**2
        assert loss == pytest.approx(analytic, rel=0.06), t


# -- the recipe -------------------------------------------------------------------------------


def test_the_recipe_names_the_objective_and_its_options_are_checked():
    recipe = load_recipe({**TOY_SECTIONS, "diffusion": {"name": "rectified-flow", "shift": 3.0}},
                         **plugins_registries())
    assert recipe.diffusion.name == "rectified-flow" and recipe.diffusion.options == RectifiedFlowOptions(shift=3.0)
    assert load_recipe(TOY_SECTIONS, **plugins_registries()).diffusion.options == EDMOptions()  # edm by default
    with pytest.raises(RecipeError) as info:
        load_recipe({**TOY_SECTIONS, "diffusion": {"name": "rectified-flow", "sigma_data": 0.5, "p_std": 0},
                     "validation": {"loss_sigmas": [0.5, 2.0]}}, **plugins_registries())
    assert set(info.value.problems) == {
        "diffusion.sigma_data: unknown key; known keys: name, condition_dropout, loss_normalization, p_mean, p_std, "
        "shift, shift_by_tokens, shift_tokens, log_shift, sample_shift, sample_shift_by_tokens, time_scale",
        "diffusion.p_std: must be > 0: 0.0",
    }
    with pytest.raises(RecipeError) as info:
        load_recipe({**TOY_SECTIONS, "diffusion": {"name": "rectified-flow"}, "validation": {"loss_sigmas": [0.5, 2.0]}},
                    **plugins_registries())
    assert info.value.problems == ["validation.loss_sigmas: rectified-flow noise levels (times t) are at most 1, got "
                                   "2 (diffusion.name = 'rectified-flow')"]
    with pytest.raises(RecipeError, match="diffusion.name: unknown objective 'rectified_flow'; did you mean "
                                          "'rectified-flow'"):
        load_recipe({**TOY_SECTIONS, "diffusion": {"name": "rectified_flow"}}, **plugins_registries())


def test_switching_the_objective_keeps_only_the_options_that_mean_the_same():
    recipe = load_recipe({**TOY_SECTIONS, "diffusion": {"p_mean": -0.4, "condition_dropout": 0.1}},
                         ["diffusion.name=rectified-flow"], **plugins_registries())
    # EDM's p_mean is the mean of ln(sigma); rectified flow's is that of logit(t): it is not carried over.
    assert recipe.diffusion.options == RectifiedFlowOptions(condition_dropout=0.1)


def plugins_registries():
    return {"registries": PluginManager(entry_points=False, extra=[(_toys(), "toy-dist 1.0")]).registries}


def _toys():
    from toys import ToyComponents

    return ToyComponents()


def test_dfmkit_plugins_lists_the_objectives(capsys):
    assert cli_main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    objectives = {c["name"]: c for c in listing["components"] if c["kind"] == "objective"}
    assert set(objectives) >= {"edm", "rectified-flow"} and objectives["edm"]["origin"] == "built-in"


# -- an objective from a plugin ---------------------------------------------------------------


@attrs.define(kw_only=True)
class DataPredictionOptions(TrainingOptions):
    """A toy objective: x = x0 + sigma n (alpha = 1) with the network predicting x0 itself, unweighted."""

    sigma_max: float = 10.0


class DataPrediction(Objective):
    def alpha(self, sigma):
        return 1.0

    def sample_sigma(self, tokens, generator=None, device=None):
        device = generator.device if generator is not None else device
        return torch.rand(len(tokens), generator=generator, device=device) * self.options.sigma_max + 1e-3

    def denoise(self, model_fn, x, sigma, batch, model_dtype=None):
        sigma = sample_levels(sigma, x, batch)
        return model_fn(x if model_dtype is None else x.to(model_dtype), sigma.log().float(), batch).to(x.dtype)

    def prediction(self, model_fn, x, sigma, x0, noise, batch, model_dtype):
        return Prediction(self.denoise(model_fn, x, sigma, batch, model_dtype), x0, torch.ones_like(sigma))

    def sampling_sigmas(self, num_steps, device=None):
        grid = torch.linspace(self.options.sigma_max, 1e-3, num_steps, dtype=torch.float64, device=device)
        return torch.cat([grid, torch.zeros(1, dtype=torch.float64, device=device)])


def test_an_objective_that_lacks_a_method_cannot_be_built():
    class Partial(Objective):
        def alpha(self, sigma):
            return 1.0

    with pytest.raises(TypeError, match="denoise"):
        Partial(DataPredictionOptions())


class DataPredictionPlugin:
    @hookimpl
    def dfmkit_register(self, registries):
        registries.objective.register("x0-prediction", lambda options, **_: DataPrediction(options),
                                      options=DataPredictionOptions)


def test_a_plugin_objective_trains_and_samples_through_the_recipe(tmp_path):
    plugins = PluginManager(extra=[(DataPredictionPlugin(), "toy-objective 0.1")])
    recipe = tiny_recipe(tmp_path)
    recipe["diffusion"] = {"name": "x0-prediction", "sigma_max": 5.0}
    recipe["validation"] = {"interval": 2, "loss_batches": 1, "loss_sigmas": [0.5, 2.0], "height": 8, "width": 8,
                            "prompts": ["a handwritten digit 3"], "guidance": 2.0}
    with pytest.raises(RecipeError, match="validation.loss_sigmas: the objective 'x0-prediction' names no default "
                                          "noise levels"):
        dfmkit.build({**recipe, "validation": {**recipe["validation"], "loss_sigmas": []}}, plugins=plugins)
    job = dfmkit.build(recipe, plugins=plugins)
    from dfmkit.train.loop import Trainer

    trainer = Trainer(job)
    assert isinstance(trainer.objective, DataPrediction) and trainer.objective.options.sigma_max == 5.0
    result = trainer.train()
    assert result["step"] == 2 and all(math.isfinite(loss) for loss in result["losses"])
    settings = json.loads((tmp_path / "ckpt" / "validation_generation" / "step_2" / "000.json").read_text())
    assert settings["objective"] == {"name": "x0-prediction", "condition_dropout": 0.2,
                                     "loss_normalization": "sample", "sigma_max": 5.0}
    generator = dfmkit.generation.load(tmp_path / "ckpt", plugins=plugins)
    [output] = generator.generate(["a handwritten digit 7"], height=8, width=8, seed=1)
    assert torch.isfinite(output.latent).all()


# -- the objective of a checkpoint ------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_checkpoint(tmp_path_factory):
    from dfmkit.train.loop import Trainer

    root = tmp_path_factory.mktemp("flow")
    recipe = tiny_recipe(root)
    recipe["diffusion"] = {"name": "rectified-flow", "shift": 2.0}
    recipe["validation"] = {"interval": 2, "loss_batches": 1, "height": 8, "width": 8}
    trainer = Trainer(dfmkit.build(recipe))
    validation = trainer.validator.validation_loss()
    result = trainer.train()
    assert result["step"] == 2
    return root, recipe, validation


def test_validation_measures_rectified_flow_at_its_own_levels(flow_checkpoint):
    _, _, validation = flow_checkpoint
    assert sorted(validation) == sorted([f"val/loss_sigma_{t:g}" for t in RectifiedFlowOptions.LOSS_SIGMAS] +
                                        ["val/loss_mean"])
    assert all(math.isfinite(v) and v > 0 for v in validation.values())


def test_resuming_under_another_objective_is_refused(flow_checkpoint):
    from dfmkit.train.loop import Trainer

    root, recipe, _ = flow_checkpoint
    edm = {**recipe, "diffusion": {"name": "edm"}, "train": {**recipe["train"], "train_iters": 4}}
    with pytest.raises(ckpt.CheckpointError, match="was trained with the objective 'rectified-flow', the recipe "
                                                   "names 'edm' \\(diffusion.name\\)"):
        Trainer(dfmkit.build(edm))
    # An option that fixes what the network computes may not change either (c_noise = time_scale t)
    rescaled = {**recipe, "diffusion": {**recipe["diffusion"], "time_scale": 1.0},
                "train": {**recipe["train"], "train_iters": 4}}
    with pytest.raises(ckpt.CheckpointError, match=r"was trained with diffusion.time_scale 1000.0, the recipe 1.0"):
        Trainer(dfmkit.build(rescaled))


def test_generation_and_export_keep_the_checkpoints_objective(flow_checkpoint, tmp_path):
    from dfmkit.generation import load
    from dfmkit.generation.export import export

    root, _, _ = flow_checkpoint
    generator = load(root / "ckpt")
    assert type(generator.objective).__name__ == "RectifiedFlow" and generator.objective.options.shift == 2.0
    [a] = generator.generate(["a handwritten digit 3"], height=8, width=8, seed=4, steps=3)
    assert torch.isfinite(a.latent).all() and a.settings["objective"]["name"] == "rectified-flow"
    # Sampling options of the objective may change; the objective may not.
    [b] = load(root / "ckpt", overrides=["diffusion.sample_shift=3"]).generate(["a handwritten digit 3"], height=8,
                                                                               width=8, seed=4, steps=3)
    assert not torch.allclose(a.latent, b.latent)
    with pytest.raises(GenerateError, match="was trained with the objective 'rectified-flow', the recipe names 'edm'"):
        load(root / "ckpt", overrides=["diffusion.name=edm"])
    with pytest.raises(GenerateError, match=r"was trained with diffusion.time_scale 1000.0, the recipe 10.0"):
        load(root / "ckpt", overrides=["diffusion.time_scale=10"])
    out = export(root / "ckpt", tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["objective"]["name"] == "rectified-flow" and config["objective"]["shift"] == 2.0
    [c] = load(out).generate(["a handwritten digit 3"], height=8, width=8, seed=4, steps=3)
    torch.testing.assert_close(c.latent, a.latent)


def test_options_that_define_the_network_are_compared_with_their_defaults_where_a_recipe_left_them_out():
    from dfmkit.recipe import objective_mismatch

    edm = load_recipe("quickstart_digits")
    assert objective_mismatch({"diffusion": {"name": "edm", "p_mean": 3.0}}, edm) is None  # training noise: free
    assert objective_mismatch({}, edm) is None  # a recipe from before objectives: EDM with its defaults
    assert objective_mismatch({"diffusion": {"sigma_data": 1.0}}, edm) == "diffusion.sigma_data 1.0, the recipe 0.5"
    changed = load_recipe("quickstart_digits", ["diffusion.sigma_data=0.7"])
    assert objective_mismatch({}, changed) == "diffusion.sigma_data 0.5, the recipe 0.7"


def test_the_butterfly_recipe_takes_the_flow_settings_the_readme_gives():
    recipe = load_recipe("dit_xl_butterfly", ["diffusion.name=rectified-flow", "diffusion.shift_by_tokens=true",
                                              "diffusion.sample_shift=3", "sampler.name=euler",
                                              "sampler.num_steps=28"])
    assert recipe.diffusion.options == RectifiedFlowOptions(shift_by_tokens=True, sample_shift=3.0)
    assert (recipe.sampler.name, recipe.sampler.options.num_steps) == ("euler", 28)
    shift = math.exp(RectifiedFlow(recipe.diffusion.options).options.log_shift[0] + (1.15 - 0.5) * (1024 - 256) / 3840)
    assert shift == pytest.approx(1.88, abs=0.01)  # the README's "about 1.9 at 1024 tokens"
