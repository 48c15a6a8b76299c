"""Recipe loading: strict types, dotted errors with suggestions, overrides, and TOML round trips."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tomllib

from dfmkit.errors import RecipeError
from dfmkit.recipe import apply_overrides, dump_recipe, load_recipe, packaged_recipes
import toys
from toys import TOY_SECTIONS


def load(data, overrides=(), plugins=None):
    return load_recipe({**TOY_SECTIONS, **data}, overrides, registries=plugins.registries)


def problems(excinfo) -> list[str]:
    return excinfo.value.problems


def test_defaults_and_component_options(toy_plugins):
    recipe = load({}, plugins=toy_plugins)
    assert recipe.train.train_iters == 20000  # more than the default warm-up of 2000 steps
    assert recipe.optim.betas == (0.9, 0.95)
    assert recipe.sampler.name == "toy-sampler"
    assert recipe.sampler.options.num_steps == 35
    assert recipe.tokenizer.options.scale == 1.0


def test_unknown_key_suggests_the_closest(toy_plugins):
    with pytest.raises(RecipeError) as info:
        load({"train": {"train_iter": 5}}, plugins=toy_plugins)
    assert problems(info) == ["train.train_iter: unknown key; did you mean train.train_iters?"]


def test_unknown_section_and_component_option_typos(toy_plugins):
    with pytest.raises(RecipeError) as info:
        load({"trian": {}, "sampler": {"name": "toy-sampler", "num_step": 10}}, plugins=toy_plugins)
    assert set(problems(info)) == {
        "trian: unknown key; did you mean train?",
        "sampler.num_step: unknown key; did you mean sampler.num_steps?",
    }


def test_wrong_types_name_the_path(toy_plugins):
    with pytest.raises(RecipeError) as info:
        load({"train": {"train_iters": "many", "seed": 1.5}, "optim": {"betas": [0.9]},
              "model": {"name": "toy-backbone", "widths": [1, "two"]}}, plugins=toy_plugins)
    assert set(problems(info)) == {
        "train.train_iters: expected an integer, got 'many' (str)",
        "train.seed: expected an integer, got 1.5 (float)",
        "optim.betas: expected an array of 2 values, got 1",
        "model.widths[1]: expected an integer, got 'two' (str)",
    }


def test_validators_report_the_path(toy_plugins):
    with pytest.raises(RecipeError) as info:
        load({"diffusion": {"condition_dropout": 1.5}, "train": {"precision": "fp8"}}, plugins=toy_plugins)
    assert set(problems(info)) == {
        "diffusion.condition_dropout: must be <= 1.0: 1.5",
        "train.precision: must be in ['auto', 'bf16', 'fp32'] (got 'fp8')",
    }


def test_non_finite_and_out_of_range_numbers_are_refused(toy_plugins):
    with pytest.raises(RecipeError) as info:
        load({"diffusion": {"p_mean": float("nan")}, "validation": {"loss_sigmas": [0.5, float("inf")]}},
             ["optim.lr=inf", "train.seed=18446744073709551616", "data.seq_length=99999999999999999999",
              "validation.guidance=nan", "sampler.sigma_max=-inf"], plugins=toy_plugins)
    assert set(problems(info)) == {
        "diffusion.p_mean: expected a finite number, got nan",
        "validation.loss_sigmas[1]: expected a finite number, got inf",
        "optim.lr: expected a finite number, got 'inf'",
        "train.seed: expected an integer that fits in 64 bits, got '18446744073709551616'",
        "data.seq_length: expected an integer that fits in 64 bits, got '99999999999999999999'",
        "validation.guidance: expected a finite number, got 'nan'",
        "sampler.sigma_max: expected a finite number, got '-inf'",
    }
    # A section's range checks run once its values have the right types.
    with pytest.raises(RecipeError) as info:
        load({}, ["optim.betas=[0.9, 1]", "train.seed=-1", "validation.seed=-2", "validation.loss_sigmas=[0, 1]"],
             plugins=toy_plugins)
    assert set(problems(info)) == {
        "optim.betas: each beta must be in [0, 1), got (0.9, 1.0)",
        "train.seed: must be an integer from 0 to 2**63 - 1, got -1",
        "validation.seed: must be an integer from 0 to 2**63 - 1, got -2",
        "validation.loss_sigmas: must be noise levels > 0, got [0.0, 1.0]",
    }


def test_a_field_that_documents_inf_takes_it_but_never_nan(toy_plugins):
    recipe = load({}, ["sampler.s_max=inf"], plugins=toy_plugins)
    assert recipe.sampler.options.s_max == float("inf")
    with pytest.raises(RecipeError) as info:
        load({}, ["sampler.s_max=nan"], plugins=toy_plugins)
    assert problems(info) == ["sampler.s_max: expected a number or inf, got 'nan'"]


def test_edm_heun_keeps_its_inf_default_through_a_dump():
    recipe = load_recipe({"sampler": {"name": "edm-heun"}}, ["sampler.s_churn=1"])
    assert recipe.sampler.options.s_max == float("inf")
    assert load_recipe(tomllib.loads(dump_recipe(recipe))) == recipe
    with pytest.raises(RecipeError, match="sampler.s_max: expected a number or inf, got nan"):
        load_recipe({"sampler": {"name": "edm-heun", "s_max": float("nan")}})


def test_unknown_component_name(toy_plugins):
    with pytest.raises(RecipeError) as info:
        load({"sampler": {"name": "toy-sampeler"}}, plugins=toy_plugins)
    [message] = problems(info)
    assert message.startswith("sampler.name: unknown sampler 'toy-sampeler'; did you mean 'toy-sampler'?")


def test_every_problem_is_reported_at_once_component_checks_included():
    """Type errors, value errors, cross-section checks and the backbone's own registry check: one report."""
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart_digits", ["model.attention=torch-sdap", "optim.warmup_iters=5000", "validation.seed=-1",
                                          "sampler.num_steps=lots", "parallel.context=4", "data.seq_length=6"])
    with pytest.raises(RecipeError) as too_many:  # not a failed allocation of the grid at the first validation
        load_recipe("quickstart_digits", ["sampler.num_steps=1000000000000"])
    [attention] = [p for p in problems(info) if p.startswith("model.attention")]
    assert attention.startswith("model.attention: unknown attention 'torch-sdap'; did you mean 'torch-sdpa'?")
    assert set(problems(info)) - {attention} == {
        "sampler.num_steps: expected an integer, got 'lots'",
        "validation.seed: must be an integer from 0 to 2**63 - 1, got -1",
        "optim.warmup_iters (5000) must be smaller than train.train_iters (1200); lower the warm-up or set "
        "optim.decay_style = \"constant\"",
        "data.seq_length (6) is smaller than 8, the tokens each sample is padded to for parallel.context = 4 "
        "(2 x context); raise data.seq_length",
    }
    assert problems(too_many) == ["sampler.num_steps: must be from 1 to 100000, got 1000000000000"]


def test_a_component_checks_itself_against_the_recipe_and_registries(toy_plugins):
    with pytest.raises(RecipeError) as info:
        load({"model": {"name": "toy-backbone", "attention": "flashy", "widths": [8, 64]},
              "data": {"seq_length": 32}}, plugins=toy_plugins)
    assert set(problems(info)) == {
        "model.attention: unknown attention 'flashy'; no such backend is registered",
        "model.widths: 64 is wider than data.seq_length (32)",
    }
    # A check that reads a section with mistakes of its own is left out; that section's mistakes are reported.
    with pytest.raises(RecipeError) as info:
        load({"model": {"name": "toy-backbone", "widths": [8, 64]}, "data": {"seq_length": "x"}}, plugins=toy_plugins)
    assert problems(info) == ["data.seq_length: expected an integer, got 'x' (str)"]


def test_validation_sizes_are_checked_against_tokenizer_and_patches_when_loading():
    """quickstart_digits: identity tokenizer, 4x4 patches; validation runs, so its size must fit."""
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart_digits", ["validation.height=18"])
    assert problems(info) == [
        "validation.height: size 1 frames x 18 x 16 (height x width) does not fit the 'identity' tokenizer with the "
        "backbone's 1 x 4 x 4 patches: its latent (3, 1, 18, 16) (C, T, H, W) does not divide into the patches. "
        "Nearest valid sizes: height 18 -> 16 or 20"]
    load_recipe("quickstart_digits", ["validation.height=18", "validation.interval=0"])  # no validation: no check
    load_recipe("quickstart_digits", ["validation.height=18", "validation.prompts=[]"])
    cosmos = ["tokenizer.name=cosmos", "model.patch_spatial=2", "model.in_channels=16"]
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart_digits", [*cosmos, "validation.frames=10", "validation.height=100",
                                          "validation.width=256"])
    [message] = problems(info)
    assert message.startswith("validation.frames, validation.height: size 10 frames x 100 x 256 (height x width) "
                              "does not fit the 'cosmos' tokenizer")
    assert message.endswith("Nearest valid sizes: frames 10 -> 9 or 13; height 100 -> 96 or 112")
    assert load_recipe("quickstart_digits", [*cosmos, "validation.frames=9", "validation.height=96"])


def test_cli_recipe_show_refuses_a_recipe_with_mistakes():
    result = subprocess.run([sys.executable, "-m", "dfmkit.cli", "recipe", "show", "quickstart_digits",
                             "model.attention=nope", "optim.warmup_iters=100000"], capture_output=True, text=True)
    assert result.returncode == 2 and "2 problems in the recipe" in result.stderr
    assert "model.attention: unknown attention 'nope'" in result.stderr and "optim.warmup_iters" in result.stderr


def test_overrides_are_coerced_to_the_field_type(toy_plugins):
    recipe = load({}, ["train.train_iters=20000", "parallel.tensor=2", "data.path=/x/y", "optim.lr=1e-4",
                       "parallel.sequence=true", "optim.betas=[0.8, 0.99]", "sampler.num_steps=18",
                       "validation.prompts=[\"a cat\", \"a dog\"]", "checkpoint.dir=\"quoted dir\"",
                       "data.mock=yes"], plugins=toy_plugins)
    assert recipe.train.train_iters == 20000
    assert recipe.parallel.tensor == 2 and recipe.parallel.sequence is True
    assert recipe.data.path == "/x/y" and recipe.data.mock is True
    assert recipe.optim.lr == 1e-4 and recipe.optim.betas == (0.8, 0.99)
    assert recipe.sampler.options.num_steps == 18
    assert recipe.validation.prompts == ["a cat", "a dog"]
    assert recipe.checkpoint.dir == "quoted dir"


def test_override_of_component_name_switches_options(toy_plugins):
    recipe = load({"sampler": {"name": "toy-sampler", "num_steps": 3}}, ["model.num_layers=4"], plugins=toy_plugins)
    assert recipe.model.options.num_layers == 4
    assert recipe.sampler.options.num_steps == 3


def test_switching_a_component_keeps_only_the_options_the_new_one_has(toy_plugins, caplog):
    base = {"sampler": {"name": "toy-sampler", "num_steps": 3, "sigma_max": 50.0}}
    recipe = load(base, ["sampler.name=toy-sampler-lite"], plugins=toy_plugins)
    assert recipe.sampler.name == "toy-sampler-lite"
    assert recipe.sampler.options == toys.ToyLiteSamplerOptions(num_steps=3)  # sigma_max dropped, num_steps kept
    back = load({"sampler": {"name": "toy-sampler-lite", "order": 2}}, ["sampler.name=toy-sampler"],
                plugins=toy_plugins)
    assert back.sampler.options == toys.ToySamplerOptions()
    # A kept value the new component refuses falls back to its default, with a warning that names it ...
    with caplog.at_level("WARNING", logger="dfmkit"):
        recipe = load({"sampler": {"name": "toy-sampler", "num_steps": 35}}, ["sampler.name=toy-sampler-lite"],
                      plugins=toy_plugins)
    assert recipe.sampler.options.num_steps == 10
    assert "sampler.num_steps = 35 of 'toy-sampler' does not suit 'toy-sampler-lite'" in caplog.text
    # ... while options given on the command line are always kept and checked.
    with pytest.raises(RecipeError) as info:
        load(base, ["sampler.name=toy-sampler-lite", "sampler.num_steps=30", "sampler.s_max=9"],
             plugins=toy_plugins)
    assert set(problems(info)) == {"sampler.num_steps: must be <= 20: 30",
                                   "sampler.s_max: unknown key; known keys: name, num_steps, order"}


def test_switching_the_sampler_of_a_resolved_recipe():
    """As `dfmkit generate --set sampler.name=edm-euler` does with a checkpoint's recipe (every default filled in)."""
    resolved = tomllib.loads(dump_recipe(load_recipe("quickstart_digits", ["sampler.s_churn=0.5"])))
    euler = load_recipe(resolved, ["sampler.name=edm-euler"])
    assert euler.sampler.name == "edm-euler" and euler.sampler.options.num_steps == 18
    assert not hasattr(euler.sampler.options, "s_churn")
    heun = load_recipe(tomllib.loads(dump_recipe(euler)), ["sampler.name=edm-heun", "sampler.s_noise=1.01"])
    assert heun.sampler.options.num_steps == 18 and heun.sampler.options.s_churn == 0.0  # the default again
    assert heun.sampler.options.s_noise == 1.01


def test_every_packaged_recipe_loads_and_keeps_its_own_checkpoints():
    """A packaged recipe with a mistake would fail only when a user runs it; two sharing a checkpoint folder would
    resume each other's runs (the flow quickstart's checkpoints refused by the EDM one, or the other way round)."""
    recipes = {name: load_recipe(name) for name in packaged_recipes()}
    assert {"quickstart_digits", "quickstart_digits_flow", "dit_xl_butterfly"} <= recipes.keys()
    folders = [recipe.checkpoint.dir for recipe in recipes.values()]
    assert len(set(folders)) == len(folders), folders


def test_the_flow_quickstart_is_the_quickstart_with_another_objective():
    """As its header says: the same data, model, steps, sampler and validation prompts; an edit to one quickstart
    alone (a model size, a prompt) fails here."""
    edm = tomllib.loads(dump_recipe(load_recipe("quickstart_digits")))
    flow = tomllib.loads(dump_recipe(load_recipe("quickstart_digits_flow")))
    assert {section for section in edm.keys() | flow.keys() if edm.get(section) != flow.get(section)} == {
        "diffusion", "checkpoint", "validation"}
    assert flow["diffusion"]["name"] == "rectified-flow" and edm["diffusion"]["name"] == "edm"
    for section, keys in (("checkpoint", {"dir"}), ("validation", {"guidance"})):
        assert {key for key in edm[section] if edm[section][key] != flow[section][key]} == keys
    assert flow["data"]["path"] == edm["data"]["path"]  # prepared once for both


def test_bad_overrides(toy_plugins):
    with pytest.raises(RecipeError) as info:
        load({"train": {"train_iters": 5}}, ["train.train_iters", "train..x=1", "train.train_iters.deeper=1"],
             plugins=toy_plugins)
    assert len(problems(info)) == 3
    with pytest.raises(RecipeError) as info:
        load({}, ["train.train_iters=lots", "train.train_iter=5"], plugins=toy_plugins)
    assert set(problems(info)) == {
        "train.train_iters: expected an integer, got 'lots'",
        "train.train_iter: unknown key; did you mean train.train_iters?",
    }


def test_apply_overrides_does_not_modify_its_input():
    data = {"train": {"train_iters": 5}}
    apply_overrides(data, ["train.train_iters=7"])
    assert data == {"train": {"train_iters": 5}}


def test_dump_parses_back_to_an_equal_recipe(toy_plugins):
    recipe = load({"validation": {"prompts": ["a", "b"]}}, ["optim.lr=3e-4", "sampler.sigma_max=90"],
                  plugins=toy_plugins)
    text = dump_recipe(recipe, registries=toy_plugins.registries)
    assert tomllib.loads(text)["sampler"] == {"name": "toy-sampler", "num_steps": 35, "sigma_max": 90.0,
                                              "s_max": float("inf")}
    again = load_recipe(tomllib.loads(text), registries=toy_plugins.registries)
    assert again == recipe


def test_missing_and_invalid_files(tmp_path, toy_plugins):
    with pytest.raises(RecipeError, match="recipe file 'nope.toml' not found"):
        load_recipe("nope.toml", registries=toy_plugins.registries)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(bad, registries=toy_plugins.registries)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("[train]\nseed = 1  # Gr\u00f6\u00dfe\n".encode("latin-1"))
    with pytest.raises(RecipeError) as info:
        load_recipe(latin1, registries=toy_plugins.registries)
    assert str(latin1) in str(info.value) and "not UTF-8" in str(info.value)


def test_cli_prints_errors_without_traceback(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\ntrain_iter = 5\n")
    result = subprocess.run([sys.executable, "-m", "dfmkit.cli", "recipe", "show", str(recipe)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "train.train_iter: unknown key; did you mean train.train_iters?" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_takes_overrides_before_and_after_options(capsys):
    from dfmkit.cli import parse_args

    args = parse_args(["run", "quickstart_digits", "train.seed=3", "--mock", "train.train_iters=7"])
    assert args.mock and args.overrides == ["train.seed=3", "train.train_iters=7"]
    for wrong in (["run", "quickstart_digits", "--mock", "--bogus"], ["generate", "--checkpoint", "c", "--out", "o", "a=b"]):
        with pytest.raises(SystemExit):  # unknown options, and overrides where a command takes none, are refused
            parse_args(wrong)
        assert "unrecognized arguments" in capsys.readouterr().err
