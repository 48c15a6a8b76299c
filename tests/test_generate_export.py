"""``dfmkit generate`` and ``dfmkit export`` on a tiny model trained for two steps (CPU, fp32).

One module-level run trains the tiny DiT (identity tokenizer, t5-tiny text encoder, mock data) and
saves a checkpoint at step 2; the tests generate from it, export it, generate from the export, and
check the errors of bad inputs. Two worker processes (gloo) generate with context and with tensor
parallelism 2 and must give the single-process latents.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import re
import shutil
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import dfmkit
from dfmkit.cli import main as cli_main
from dfmkit.errors import RecipeError
from dfmkit.generation import (
    GenerateError,
    generate_for_job,
    latent_shape_for,
    load,
    make_requests,
    read_prompt_file,
)
from dfmkit.generation.export import export
from dfmkit.generation.export_format import ExportError, is_export
from dfmkit.generation.outputs import NonFiniteOutputError

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]
SIZES = dict(height=[8, 16], width=[8, 12])  # two sizes in one pack: 16 and 48 latent tokens (patch 2)


def tiny_recipe(root: Path) -> dict:
    return {
        "model": {"name": "dit", "preset": "tiny", "in_channels": 3, "text_dim": 64, "patch_spatial": 2},
        "tokenizer": {"name": "identity"},
        "text_encoder": {"name": "t5-tiny", "path": str(root / "t5-tiny")},
        "task_encoder": {"name": "packed"},
        "sampler": {"name": "edm-heun", "num_steps": 2},
        "data": {"mock": True, "mock_latent_shape": [3, 1, 8, 8], "mock_text_tokens": 4, "mock_text_dim": 64,
                 "seq_length": 64},
        "train": {"train_iters": 2, "global_batch_size": 1, "device": "cpu", "log_interval": 1},
        # A large learning rate so two steps move every weight well away from its initial value (and
        # the EMA well away from the raw weights).
        "optim": {"warmup_iters": 0, "lr": 3e-2},
        "checkpoint": {"dir": str(root / "ckpt"), "save_interval": 2},
        "validation": {"interval": 0, "height": 8, "width": 8, "seed": 11},
        "logging": {"progress": False},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dfmkit.train.loop import Trainer

    root = tmp_path_factory.mktemp("generate")
    job = dfmkit.build(tiny_recipe(root))
    trainer = Trainer(job)
    result = trainer.train()
    assert result["step"] == 2 and (root / "ckpt" / "iter_0000002" / "dfmkit.json").is_file()
    names = [n for n, p in trainer.state.model.named_parameters() if p.requires_grad]
    ema = {n: s.detach().clone() for n, s in zip(names, trainer.state.ema.shadow)}
    raw = {n: p.detach().clone() for n, p in trainer.state.model.named_parameters()}
    return {"root": root, "job": job, "ema": ema, "raw": raw}


@pytest.fixture(scope="module")
def from_checkpoint(trained):
    generator = load(trained["root"] / "ckpt")
    outputs = generator.generate(PROMPTS, **SIZES, seed=5, out=trained["root"] / "out_ckpt")
    return generator, outputs


@pytest.fixture(scope="module")
def exported(trained):
    out = trained["root"] / "export"
    assert export(trained["root"] / "ckpt", out) == out
    return out


# --------------------------------------------------------------------------------------------
# From a checkpoint
# --------------------------------------------------------------------------------------------


def test_generate_from_checkpoint_writes_images_and_settings(trained, from_checkpoint):
    _, outputs = from_checkpoint
    out = trained["root"] / "out_ckpt"
    assert sorted(p.name for p in out.iterdir()) == ["000.json", "000.png", "001.json", "001.png"]
    for output, (height, width), prompt in zip(outputs, [(8, 8), (16, 12)], PROMPTS):
        image = np.asarray(Image.open(out / f"{output.index:03d}.png"))
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        assert output.latent.shape == (3, 1, height, width)
        assert output.pixels.shape == (3, 1, height, width)
        # The PNG holds exactly the decoded pixels.
        expected = ((output.pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(image, expected)
        settings = json.loads((out / f"{output.index:03d}.json").read_text())
        assert settings["prompt"] == prompt and settings["seed"] == 5 + output.index
        assert (settings["height"], settings["width"], settings["frames"]) == (height, width, 1)
        assert settings["latent_shape"] == [3, 1, height, width]
        assert settings["weights"] == "ema" and settings["guidance"] == 7.0
        assert settings["sampler"]["name"] == "edm-heun" and settings["num_steps"] == 2
        assert settings["sampler"]["s_max"] == "inf"  # non-finite floats are written as strings (strict JSON)
        assert settings["source"] == {"kind": "checkpoint", "path": str(trained["root"] / "ckpt" / "iter_0000002"),
                                      "iteration": 2}
        assert settings["file"] == f"{output.index:03d}.png"
        assert "--seed" in settings["command"] and prompt in settings["command"]
    assert not torch.allclose(outputs[0].latent, outputs[1].latent[:, :, :8, :8])


def test_ema_weights_by_default_and_raw_weights_on_request(trained, from_checkpoint):
    generator, _ = from_checkpoint
    params = dict(generator.model.named_parameters())
    assert set(trained["ema"]) == set(params)
    for name, value in trained["ema"].items():
        assert torch.equal(params[name], value), name
    raw = dict(load(trained["root"] / "ckpt", weights="model").model.named_parameters())
    for name, value in trained["raw"].items():
        assert torch.equal(raw[name], value), name
    # The two are different weights (so the checks above can fail).
    assert any(not torch.equal(trained["ema"][n], trained["raw"][n]) for n in trained["ema"])


def test_each_output_depends_only_on_its_own_seed(from_checkpoint):
    """Output i is seeded with seed + i whatever shares its pack: generated alone it is the same sample."""
    generator, outputs = from_checkpoint
    alone = generator.generate([PROMPTS[1]], height=16, width=12, seed=6)[0]
    assert alone.seed == 6
    torch.testing.assert_close(alone.latent, outputs[1].latent, rtol=1e-4, atol=1e-4)
    split = generator.generate(PROMPTS, **SIZES, seed=5, max_tokens=16)  # one pack per prompt
    for a, b in zip(split, outputs):
        torch.testing.assert_close(a.latent, b.latent, rtol=1e-4, atol=1e-4)


def test_settings_override_the_recipe(from_checkpoint):
    generator, outputs = from_checkpoint
    euler = generator.generate([PROMPTS[0]], seed=5, steps=2, sampler="edm-euler", guidance=1.0)[0]
    assert euler.settings["sampler"] == {"name": "edm-euler", "num_steps": 2}
    assert euler.settings["objective"] == {"name": "edm", "condition_dropout": 0.2, "loss_normalization": "sample",
                                           "sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2, "sigma_min": 0.002,
                                           "sigma_max": 80.0, "rho": 7.0}  # the sampling grid is the objective's
    assert euler.settings["guidance"] == 1.0
    assert not torch.allclose(euler.latent, outputs[0].latent)
    default = generator.generate([PROMPTS[0]])[0]  # sizes and seed from the recipe's [validation]
    assert (default.height, default.width, default.frames, default.seed) == (8, 8, 1, 11)
    with pytest.raises(RecipeError, match="sampler.name: unknown sampler 'edm-hune'; did you mean 'edm-heun'"):
        generator.generate([PROMPTS[0]], sampler="edm-hune")
    with pytest.raises(RecipeError, match="sampler.num_steps: "):
        generator.generate([PROMPTS[0]], steps=0)


def test_generate_for_job_uses_the_recipe_checkpoint(trained, from_checkpoint):
    _, outputs = from_checkpoint
    again = generate_for_job(trained["job"], PROMPTS, **SIZES, seed=5)
    for a, b in zip(again, outputs):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.pixels, b.pixels)


# --------------------------------------------------------------------------------------------
# Export and generation from the export
# --------------------------------------------------------------------------------------------


def test_export_files(trained, exported):
    from safetensors import safe_open

    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == "dfmkit-export" and config["version"] == 1 and config["iteration"] == 2
    assert config["backbone"]["name"] == "dit" and config["backbone"]["preset"] == "tiny"
    assert config["backbone"]["in_channels"] == 3
    assert config["tokenizer"] == {"name": "identity", "scale": 1.0}
    assert config["text_encoder"]["name"] == "t5-tiny"
    assert "[model]" in config["recipe"] and 'name = "dit"' in config["recipe"]
    for weights, reference in (("ema", trained["ema"]), ("model", trained["raw"])):
        with safe_open(str(exported / f"{weights}.safetensors"), "pt") as f:
            assert f.metadata()["weights"] == weights
            assert set(f.keys()) == set(trained["raw"])  # plain state_dict names, every parameter
            for name, value in reference.items():
                assert torch.equal(f.get_tensor(name), value), name


def test_generate_from_export_matches_checkpoint_bitwise(trained, exported, from_checkpoint):
    _, outputs = from_checkpoint
    generator = load(exported)
    again = generator.generate(PROMPTS, **SIZES, seed=5, out=trained["root"] / "out_export")
    for a, b in zip(again, outputs):
        assert torch.equal(a.latent, b.latent)
        assert torch.equal(a.pixels, b.pixels)
        assert a.settings["source"]["kind"] == "export"
    for name in ("000.png", "001.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(trained["root"] / "out_export" / name)),
                                      np.asarray(Image.open(trained["root"] / "out_ckpt" / name)))


def test_export_loads_without_distributed_checkpoint(trained, exported, tmp_path, monkeypatch):
    """An export is self-contained: it loads with the checkpoint folder gone and dist_checkpointing disabled."""
    import megatron.core.dist_checkpointing as dc

    copy = tmp_path / "export"
    shutil.copytree(exported, copy)

    def forbidden(*args, **kwargs):
        raise AssertionError("an export must not be read through megatron's distributed checkpoint")

    monkeypatch.setattr(dc, "load", forbidden)
    monkeypatch.setattr(dc, "load_tensors_metadata", forbidden)
    generator = load(copy, weights="model")
    params = dict(generator.model.named_parameters())
    for name, value in trained["raw"].items():
        assert torch.equal(params[name], value), name


def test_export_config_sections_win_over_the_stored_recipe(exported, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(exported, copy)
    config = json.loads((copy / "config.json").read_text())
    config["tokenizer"]["scale"] = 2.0
    (copy / "config.json").write_text(json.dumps(config))
    assert load(copy).recipe.tokenizer.options.scale == 2.0


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def test_cli_generate_and_export(trained, exported, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[0], "height": 8, "width": 8, "frames": 3}) + "\n\n"
                       + json.dumps({"prompt": PROMPTS[1]}) + "\n")
    out = tmp_path / "cli_out"
    rc = cli_main(["generate", "--checkpoint", str(exported), "--prompt-file", str(prompts), "--height", "8",
                   "--width", "12", "--steps", "1", "--seed", "3", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["000.json", "000.mp4", "001.json", "001.png"]
    import imageio.v2 as imageio

    frames = imageio.mimread(out / "000.mp4")
    assert len(frames) == 3 and frames[0].shape == (8, 8, 3)
    video = json.loads((out / "000.json").read_text())
    assert (video["frames"], video["height"], video["width"], video["seed"]) == (3, 8, 8, 3)
    assert video["latent_shape"] == [3, 3, 8, 8] and video["num_steps"] == 1
    image = json.loads((out / "001.json").read_text())
    assert (image["frames"], image["height"], image["width"], image["seed"]) == (1, 8, 12, 4)

    again = tmp_path / "export_cli"
    iteration = trained["root"] / "ckpt" / "iter_0000002"
    assert cli_main(["export", "--checkpoint", str(iteration), "--out", str(again)]) == 0
    assert "exported iteration 2" in capsys.readouterr().out
    assert is_export(again)
    assert cli_main(["export", "--checkpoint", str(trained["root"] / "ckpt"), "--out", str(again)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["export", "--checkpoint", str(trained["root"] / "ckpt"), "--out", str(again), "--overwrite"]) == 0


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_incomplete_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
    incomplete = tmp_path / "ckpt"
    shutil.copytree(trained["root"] / "ckpt" / "iter_0000002", incomplete / "iter_0000004")
    (incomplete / "iter_0000004" / "dfmkit.json").unlink()  # a save killed before its marker
    with pytest.raises(GenerateError, match=r"holds no complete checkpoint.*iter_0000004 without dfmkit\.json"):
        load(incomplete)
    with pytest.raises(GenerateError, match="holds no complete checkpoint"):
        load(tmp_path)  # no checkpoint at all
    with pytest.raises(GenerateError, match="does not exist"):
        load(tmp_path / "missing")
    rc = cli_main(["generate", "--checkpoint", str(incomplete), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert rc == 2 and "no complete checkpoint" in capsys.readouterr().err
    with pytest.raises(GenerateError, match="holds no complete checkpoint"):
        export(incomplete, tmp_path / "export")


def test_checkpoint_that_does_not_fit_its_recipe(trained, tmp_path):
    broken = tmp_path / "iter_0000002"
    shutil.copytree(trained["root"] / "ckpt" / "iter_0000002", broken)
    marker = json.loads((broken / "dfmkit.json").read_text())
    marker["recipe"] = marker["recipe"].replace('preset = "tiny"', 'preset = "S"')
    (broken / "dfmkit.json").write_text(json.dumps(marker))
    with pytest.raises(GenerateError, match="does not fit the model of its recipe"):
        load(broken)


def test_empty_prompt_file_is_a_clear_error(trained, tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(GenerateError, match="holds no prompts"):
        read_prompt_file(empty)
    rc = cli_main(["generate", "--checkpoint", str(trained["root"] / "ckpt"), "--prompt-file", str(empty),
                   "--out", str(tmp_path / "o")])
    assert rc == 2 and "holds no prompts" in capsys.readouterr().err
    with pytest.raises(GenerateError, match="cannot read the prompt file"):
        read_prompt_file(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(GenerateError, match=r'bad\.jsonl:1: each line needs a "prompt"'):
        read_prompt_file(bad)
    with pytest.raises(GenerateError, match="no prompts"):
        make_requests([], height=None, width=None, frames=None, defaults=(1, 8, 8))
    with pytest.raises(GenerateError, match="3 values of height for 2 prompts"):
        make_requests(PROMPTS, height=[8, 8, 8], width=None, frames=None, defaults=(1, 8, 8))


def test_misaligned_size_names_the_nearest_valid_ones(from_checkpoint, tmp_path):
    generator, _ = from_checkpoint
    with pytest.raises(GenerateError, match=r"1 frames x 9 x 8 .*patches.*height 9 -> 8 or 10") as info:
        generator.generate(PROMPTS, height=[8, 9], width=8, out=tmp_path / "o")
    assert "width" not in str(info.value).split("Nearest valid sizes:")[1]
    assert not (tmp_path / "o").exists()  # nothing is sampled or written before the sizes are checked


def test_alignment_of_a_video_tokenizer():
    """Cosmos CV4x8x8 (no weights needed for the arithmetic): sides of multiples of 16, frames 1 + 4k."""
    from dfmkit.components.tokenizers.cosmos import CosmosOptions, CosmosTokenizer

    tokenizer = CosmosTokenizer(CosmosOptions())
    assert latent_shape_for(tokenizer, 2, 1, 17, 256, 512) == (16, 5, 32, 64)
    with pytest.raises(GenerateError, match=r"frames 10 -> 9 or 13"):
        latent_shape_for(tokenizer, 2, 1, 10, 256, 256)
    with pytest.raises(GenerateError, match=r"height 100 -> 96 or 112; width 250 -> 240 or 256"):
        latent_shape_for(tokenizer, 2, 1, 1, 100, 250)
    # Patches in time: 2 latent frames per patch needs an even latent frame count (frames 5, 13, ...).
    with pytest.raises(GenerateError, match=r"frames 9 -> 5 or 13"):
        latent_shape_for(tokenizer, 2, 2, 9, 256, 256)


# --------------------------------------------------------------------------------------------
# Refusals: non-finite outputs, output folders that cannot be, requests that cannot fit in memory
# --------------------------------------------------------------------------------------------


def test_non_finite_outputs_are_refused_and_nothing_is_written(exported, from_checkpoint, tmp_path, capsys):
    generator, _ = from_checkpoint
    message = (r"outputs 0 \('a handwritten digit 3'\), 1 \('a handwritten digit 7'\) hold NaN or inf, so no file is "
               r"written; likely cause: guidance w = 1e\+38 too large")
    with pytest.raises(NonFiniteOutputError, match=message) as info:
        generator.generate(PROMPTS, **SIZES, guidance=1e38, out=tmp_path / "guidance")
    assert info.value.indices == [0, 1] and not (tmp_path / "guidance").exists()
    rc = cli_main(["generate", "--checkpoint", str(exported), "--prompt", "x", "--guidance", "1e38",
                   "--out", str(tmp_path / "cli")])
    assert rc == 2 and "output 0 ('x') holds NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan_weights"
    shutil.copytree(exported, broken)
    weights = load_file(str(broken / "ema.safetensors"))
    weights["x_embedder.weight"][0, 0] = float("nan")
    save_file(weights, str(broken / "ema.safetensors"))
    with pytest.raises(NonFiniteOutputError, match=r"likely cause: the weights hold NaN or inf \(x_embedder\.weight\)"):
        load(broken).generate(PROMPTS, **SIZES, out=tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_an_output_folder_that_cannot_be_is_refused_before_sampling(trained, exported, from_checkpoint, tmp_path,
                                                                     capsys):
    generator, _ = from_checkpoint
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out, message in ((afile, f"the output folder '{afile}' is a file; give --out a folder"),
                         (afile / "sub", f"the output folder '{afile / 'sub'}' cannot be made: '{afile}' is a file")):
        with pytest.raises(GenerateError, match=re.escape(message)):
            generator.generate(PROMPTS, **SIZES, out=out)
        assert cli_main(["generate", "--checkpoint", str(exported), "--prompt", "x", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert cli_main(["export", "--checkpoint", str(trained["root"] / "ckpt"), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert afile.read_text() == "not a folder"


def test_a_request_that_cannot_fit_in_memory_is_refused_before_anything_is_allocated(exported, from_checkpoint,
                                                                                    tmp_path, monkeypatch, capsys):
    rc = cli_main(["generate", "--checkpoint", str(exported), "--prompt", "x", "--height", "65536", "--width", "65536",
                   "--out", str(tmp_path / "cli")])
    assert rc == 2 and "the largest is output 0: 1 x 65536 x 65536" in capsys.readouterr().err
    generator, _ = from_checkpoint

    def never(prompts):
        raise AssertionError("the prompts were encoded: the request was not refused before any work")

    monkeypatch.setattr(generator, "encode_prompts", never)
    # The latent and the decoded pixels are 2 x 48 GiB (float32, identity tokenizer), one MLP over the 2 x 2**30 rows
    # of the guided pack 2.6 TiB: more than any machine has.
    message = (r"needs at least \d+\.\d GiB of memory \(96\.0 GiB of latents and decoded pixels, .*\), more than the "
               r"\d+\.\d [GM]iB available; ask for smaller sizes \(the largest is output 1: 1 x 65536 x 65536\)")
    with pytest.raises(GenerateError, match=message):
        generator.generate(PROMPTS, height=[8, 65536], width=[8, 65536], out=tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path / "cli").exists()


def test_the_memory_rule(from_checkpoint, tmp_path, monkeypatch):
    """The lower bound of dfmkit.generation.memory, counted by hand for the tiny DiT (hidden 64, MLP 256, fp32, patch
    2) and two outputs of 8 x 8 and 16 x 12 pixels (identity tokenizer: latents of 3 x 1 x 8 x 8 and 3 x 1 x 16 x 12)
    in one guided pack; generation runs with exactly that much memory available and is refused with a byte less."""
    from dfmkit.generation import memory
    from dfmkit.generation.prompts import Request

    generator, _ = from_checkpoint
    requests = [Request("a", 8, 8, 1), Request("b", 16, 12, 1)]
    need = memory.memory_need(requests, [(3, 1, 8, 8), (3, 1, 16, 12)], [[0, 1]], patch_spatial=2, patch_temporal=1,
                              pad_multiple=1, guided=True, model=generator.model, dtype=torch.float32)
    latents = 3 * 8 * 8 + 3 * 16 * 12  # floats; the decoded pixels are as many
    assert need.kept == 2 * latents * 4
    tokens = 4 * 4 + 8 * 6
    assert need.pack_tokens == tokens and need.pack == 3 * latents * 4 + 2 * tokens * (64 + 256) * 4
    assert need.largest == "output 1: 1 x 16 x 12"

    available = need.kept + need.pack
    monkeypatch.setattr(memory, "host_available", lambda: available)
    assert len(generator.generate(["a", "b"], height=[8, 16], width=[8, 12], guidance=2.0)) == 2
    available -= 1
    with pytest.raises(GenerateError, match=r"needs at least 0\.2 MiB of memory .*more than the 0\.2 MiB available"):
        generator.generate(["a", "b"], height=[8, 16], width=[8, 12], guidance=2.0)
    # On a GPU the largest pack is held against the GPU's free memory, what is kept against host memory.
    monkeypatch.setattr(memory, "device_available", lambda device: need.pack - 1)
    with pytest.raises(GenerateError, match=r"of GPU memory to sample its largest pack of 64 tokens.*--max-tokens"):
        memory.check_memory(need, torch.device("cuda", 0))
    monkeypatch.setattr(memory, "device_available", lambda device: need.pack)
    monkeypatch.setattr(memory, "host_available", lambda: need.kept - 1)
    with pytest.raises(GenerateError, match=r"of host memory for its latents and decoded pixels"):
        memory.check_memory(need, torch.device("cuda", 0))
    monkeypatch.setattr(memory, "host_available", lambda: need.kept)
    memory.check_memory(need, torch.device("cuda", 0))


def test_graphs_kept_from_earlier_calls_give_way_to_a_request_that_needs_their_memory(from_checkpoint, monkeypatch):
    """The memory check counts the GPU memory of CUDA graphs kept for later calls as taken: a request refused for
    want of memory is checked again after the Generator drops them, and refused only if it still does not fit."""
    from dfmkit.generation import generator as generator_module

    generator, _ = from_checkpoint
    graphs = generator._sampling_model().graphs
    checks = []

    def check_memory(need, device):
        checks.append(len(graphs))
        if len(graphs):
            raise GenerateError("needs more memory than is free")

    monkeypatch.setattr(generator_module, "check_memory", check_memory)
    graphs._graphs["a kept pack"] = object()  # as a GPU run leaves one
    assert len(generator.generate(["a"], height=[8], width=[8])) == 1
    assert checks == [1, 0] and not graphs

    def never_fits(need, device):
        raise GenerateError("needs more memory than is free")

    monkeypatch.setattr(generator_module, "check_memory", never_fits)
    graphs._graphs["a kept pack"] = object()
    with pytest.raises(GenerateError, match="more memory than is free"):
        generator.generate(["a"], height=[8], width=[8])
    assert not graphs


# --------------------------------------------------------------------------------------------
# Exports read as untrusted input, and written like any other output
# --------------------------------------------------------------------------------------------


def _copy_with_config(exported: Path, copy: Path, **changes) -> Path:
    shutil.copytree(exported, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_export_weights_outside_the_folder_are_refused(exported, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(exported / "ema.safetensors", outside)  # a valid weight file: only where it is makes it wrong
    cases = {
        "parent": ({"ema": "../outside.safetensors", "model": "model.safetensors"}, "points outside the export folder"),
        "absolute": ({"ema": "/etc/passwd", "model": "model.safetensors"}, "points outside the export folder"),
        "hidden parent": ({"ema": "sub/../../outside.safetensors", "model": "model.safetensors"}, "points outside"),
    }
    for name, (weights, message) in cases.items():
        copy = _copy_with_config(exported, tmp_path / name, weights=weights)
        with pytest.raises(ExportError, match=rf"{copy / 'config.json'}: 'weights.ema' = .*{message}"):
            load(copy)
    linked = tmp_path / "linked"
    shutil.copytree(exported, linked)
    (linked / "ema.safetensors").unlink()
    (linked / "ema.safetensors").symlink_to(outside)
    with pytest.raises(ExportError, match=rf"'weights.ema' = \"ema.safetensors\" is a link to {outside}, outside"):
        load(linked)
    # A link that stays inside the folder is fine.
    inside = tmp_path / "inside"
    shutil.copytree(exported, inside)
    (inside / "ema.safetensors").rename(inside / "weights.bin")
    (inside / "ema.safetensors").symlink_to("weights.bin")
    load(inside)


def test_export_weights_that_are_not_a_table_are_refused(exported, tmp_path, capsys):
    cases = (("list", ["ema.safetensors"], "must be a table of weight files.*got list"),
             ("number", {"ema": 3, "model": "model.safetensors"}, "'weights.ema' must be a file"))
    for name, weights, message in cases:
        copy = _copy_with_config(exported, tmp_path / name, weights=weights)
        with pytest.raises(ExportError, match=message):
            load(copy)
        rc = cli_main(["generate", "--checkpoint", str(copy), "--prompt", "x", "--out", str(tmp_path / "o")])
        assert rc == 2 and "config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _write_safetensors_header(path: Path, tensors: dict[str, torch.Tensor], claimed: dict[str, tuple]) -> int:
    """A safetensors file with ``tensors`` and, after them, entries ``claimed`` (name: (dtype, shape)) whose data is
    a hole of the claimed size (a sparse file: nothing written, nothing on disk). Returns the claimed bytes."""
    header, offset, chunks = {}, 0, []
    for name, tensor in tensors.items():
        data = tensor.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    claimed_bytes = 0
    for name, (dtype, shape) in claimed.items():
        size = int(np.prod(shape)) * {"F32": 4, "I64": 8}[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        claimed_bytes += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for chunk in chunks:
            f.write(chunk)
        f.truncate(8 + len(text) + offset)
    return claimed_bytes


def _memory_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def test_a_tampered_weight_header_is_refused_before_anything_is_allocated(exported, tmp_path):
    """A weight file whose header claims a 9.7 GB tensor is refused from its header: the peak memory of the process
    grows by far less than the claim (reading the tensor would make it resident)."""
    from safetensors.torch import load_file

    copy = tmp_path / "tampered"
    shutil.copytree(exported, copy)
    tensors = load_file(str(exported / "ema.safetensors"))
    huge = "x_embedder.weight"
    claimed = _write_safetensors_header(copy / "ema.safetensors", {k: v for k, v in tensors.items() if k != huge},
                                        {huge: ("F32", (49152, 49152))})
    assert claimed > 9.6e9 and (copy / "ema.safetensors").stat().st_blocks * 512 < 1e8  # a hole, not 9.7 GB of disk
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the memory in use now
    before = _memory_kib("VmRSS")
    with pytest.raises(ExportError, match=rf"{huge} has shape \(49152, 49152\), the model's is \(\d+, \d+\)"):
        load(copy)
    assert (_memory_kib("VmHWM") - before) * 1024 < 2**30
    # Names and dtypes are checked too.
    renamed = {("x_embedder.renamed" if k == huge else k): v for k, v in tensors.items()}
    _write_safetensors_header(copy / "ema.safetensors", renamed, {})
    with pytest.raises(ExportError, match=r"missing x_embedder\.weight; unexpected x_embedder\.renamed"):
        load(copy)
    _write_safetensors_header(copy / "ema.safetensors", {k: v for k, v in tensors.items() if k != huge},
                              {huge: ("I64", tuple(tensors[huge].shape))})
    with pytest.raises(ExportError, match=rf"{huge} has dtype I64, the model's needs F32 or BF16 or F16"):
        load(copy)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_export_files_follow_the_umask(trained, tmp_path, umask):
    """safetensors writes its files with mode 0600; an export's files get the user's umask like any other output."""
    previous = os.umask(umask)
    try:
        out = export(trained["root"] / "ckpt", tmp_path / "export")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors"]
    for file in out.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file.name


# --------------------------------------------------------------------------------------------
# Context and tensor parallelism (2 processes, gloo)
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parallel_worker(rank: int, world: int, port: int, sources: dict[str, str], outdir: str) -> None:
    from safetensors.torch import save_file

    from dfmkit import parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for name, (source, tensor, context) in sources.items():
            generator = load(source, tensor=tensor, context=context)
            outputs = generator.generate(PROMPTS, **SIZES, seed=5)
            assert (generator.env.tp_size, generator.env.cp_size) == (tensor, context)
            if rank == 0:
                latents = {str(o.index): o.latent.contiguous() for o in outputs}
                save_file(latents, os.path.join(outdir, f"{name}.safetensors"))
    finally:
        parallel.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_context_and_tensor_parallel_generation_match_one_process(trained, exported, from_checkpoint, tmp_path):
    from safetensors.torch import load_file

    _, outputs = from_checkpoint
    sources = {"cp2_export": (str(exported), 1, 2), "tp2_checkpoint": (str(trained["root"] / "ckpt"), 2, 1)}
    multiprocessing.set_forkserver_preload(["dfmkit.generation", "dfmkit.components.backbones.dit"])
    mp.start_processes(_parallel_worker, args=(2, _free_port(), sources, str(tmp_path)), nprocs=2,
                       start_method="forkserver")
    for name in sources:
        latents = load_file(str(tmp_path / f"{name}.safetensors"))
        for output in outputs:
            torch.testing.assert_close(latents[str(output.index)], output.latent, rtol=1e-4, atol=1e-4, msg=name)
