"""Training through `dfmkit.train`: exact resume, killed saves, parallel layouts, non-finite losses, validation."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dfmkit
from dfmkit.compat.megatron_optimizer import torch_adams
from dfmkit.errors import GenerateError, RecipeError
from dfmkit.generation import latent_shape_for, load
from dfmkit.train import checkpoint as ckpt
from dfmkit.train.loop import TrainingStopped, Trainer, train

WORKER = Path(__file__).with_name("train_worker.py")


def tiny_recipe(checkpoint_dir, **sections):
    recipe = {
        "model": {"name": "dit", "preset": "tiny", "in_channels": 3, "text_dim": 64},
        "sampler": {"name": "edm-euler", "num_steps": 4},
        "tokenizer": {"name": "identity"},
        "text_encoder": {"name": "t5-tiny"},
        "task_encoder": {"name": "packed"},
        "data": {"mock": True, "seq_length": 64, "mock_latent_shape": [3, 1, 8, 8], "mock_text_tokens": 4,
                 "mock_text_dim": 64, "mock_samples_per_pack": 3},
        "train": {"train_iters": 6, "global_batch_size": 2, "log_interval": 1},
        "optim": {"warmup_iters": 2, "lr": 1e-3},
        "checkpoint": {"dir": str(checkpoint_dir), "save_interval": 3},
        "validation": {"interval": 0},
        "logging": {"progress": False},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


def start_worker(tmp_path, recipe, name, nproc=1, **config):
    """tests/train_worker.py in a session of its own (under torchrun with ``nproc`` > 1); returns the process, its
    command, and the paths of its log and of its result."""
    out = tmp_path / f"{name}.json"
    config_file = tmp_path / f"{name}.config.json"
    config_file.write_text(json.dumps({"recipe": recipe, "out": str(out), **config}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    if nproc == 1:
        command = [sys.executable, str(WORKER), str(config_file)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-port", str(_free_port()), str(WORKER), str(config_file)]
    log = tmp_path / f"{name}.log"
    # Output to a file and a session of its own: a killed run can leave megatron's checkpoint-writer helper
    # process behind, which would hold pipes open; it is ended with the session.
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return process, command, log, out


def finish_worker(process, command, log, out, timeout=240):
    """Wait for a worker of :func:`start_worker` (at most ``timeout`` s, then kill its session: TimeoutExpired);
    returns (CompletedProcess with its output, its result or None)."""
    try:
        process.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    result = subprocess.CompletedProcess(command, process.returncode, log.read_text(), log.read_text())
    return result, (json.loads(out.read_text()) if out.exists() else None)


def run_worker(tmp_path, recipe, name, nproc=1, **config):
    return finish_worker(*start_worker(tmp_path, recipe, name, nproc, **config))


def run_cli(tmp_path, args, name, nproc=1, timeout=240):
    """``dfmkit ARGS`` in a process of its own (under torchrun with ``nproc`` > 1); returns (exit code, output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                                      str(_free_port())]
    command = [sys.executable, *launcher, "-m", "dfmkit.cli", *args]
    log = tmp_path / f"{name}.log"
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, log.read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resume_gives_the_same_loss_at_every_step(tmp_path):
    whole = train(dfmkit.build(tiny_recipe(tmp_path / "whole")))
    first = train(dfmkit.build(tiny_recipe(tmp_path / "split")), until_step=3)
    assert ckpt.find_checkpoint(tmp_path / "split").name == "iter_0000003"
    rest = train(dfmkit.build(tiny_recipe(tmp_path / "split")))
    assert first["losses"] + rest["losses"] == whole["losses"]  # bitwise on CPU
    assert rest["step"] == 6 and len(rest["losses"]) == 3
    assert len(set(whole["losses"])) == 6  # the losses really move from step to step


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    recipe = tiny_recipe(tmp_path / "ck", checkpoint={"save_interval": 2})
    result, _ = run_worker(tmp_path, recipe, "killed", kill_during_save_at=4)
    assert result.returncode == -9, result.stderr[-2000:]
    root = tmp_path / "ck"
    assert (root / "latest").read_text().strip() == "2"
    assert (root / ".tmp_iter_0000004").is_dir() and not (root / "iter_0000004").exists()
    assert ckpt.find_checkpoint(root).name == "iter_0000002"
    resumed = train(dfmkit.build(recipe))
    assert resumed["step"] == 6 and len(resumed["losses"]) == 4
    assert not (root / ".tmp_iter_0000004").exists()  # cleared by the next save
    assert ckpt.complete_iterations(root) == [2, 4, 6]


@pytest.mark.parametrize("layout", [{"tensor": 2}, {"tensor": 2, "sequence": True}, {"context": 2}])
def test_parallel_layouts_train_like_one_process(tmp_path, layout):
    single = train(dfmkit.build(tiny_recipe(tmp_path / "one", train={"train_iters": 3},
                                            optim={"warmup_iters": 1})))
    recipe = tiny_recipe(tmp_path / "two", parallel=layout, train={"train_iters": 3}, optim={"warmup_iters": 1})
    result, parallel = run_worker(tmp_path, recipe, "layout", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert parallel["step"] == 3
    torch.testing.assert_close(torch.tensor(parallel["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=0)
    # Adam hides a constant gradient scale from the losses; the gradient norm does not.
    torch.testing.assert_close(torch.tensor(parallel["grad_norms"]), torch.tensor(single["grad_norms"]), rtol=1e-4, atol=0)


def test_data_parallel_splits_the_global_batch(tmp_path):
    recipe = tiny_recipe(tmp_path / "dp", train={"train_iters": 2, "global_batch_size": 4}, optim={"warmup_iters": 1})
    result, out = run_worker(tmp_path, recipe, "dp", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out["step"] == 2 and all(torch.isfinite(torch.tensor(out["losses"])))


class NonFinite:
    """Mock packs whose latents are NaN from the third batch on."""

    def __init__(self, recipe):
        from dfmkit.data.mock import MockLoader

        self.inner = MockLoader(recipe)

    def __next__(self):
        batch = next(self.inner)
        if self.inner.batches > 4:
            batch.latents[:] = float("nan")
        return batch


def test_non_finite_losses_skip_steps_then_stop_with_a_save(tmp_path):
    job = dfmkit.build(tiny_recipe(tmp_path / "nan", train={"max_nonfinite_steps": 2, "train_iters": 10}))
    trainer = Trainer(job, data=NonFinite(job.recipe))
    before = [p.detach().clone() for p in trainer.state.model.parameters()]
    with pytest.raises(TrainingStopped, match="2 steps in a row had a non-finite loss or gradient norm"):
        trainer.train()
    assert trainer.state.step == 4 and trainer.state.nonfinite_total == 2
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())  # skipped steps changed nothing
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.state.model.parameters()))
    assert ckpt.find_checkpoint(tmp_path / "nan").name == "iter_0000004"


def test_non_finite_gradients_of_a_finite_loss_skip_the_step(tmp_path):
    job = dfmkit.build(tiny_recipe(tmp_path / "nan_grad"))
    trainer = Trainer(job)
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.state.model.parameters()]
    steps_before = [dict(s)["step"].clone() for _, inner in torch_adams(trainer.state.optimizer) for s in inner.state.values()]
    hook = next(trainer.state.model.parameters()).register_hook(lambda grad: grad * float("nan"))
    metrics = trainer.train_step()
    hook.remove()
    assert metrics["skipped_nonfinite"] == 1.0 and trainer.state.nonfinite_total == 1 and trainer.state.step == 2
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.state.model.parameters()))
    steps_after = [s["step"] for _, inner in torch_adams(trainer.state.optimizer) for s in inner.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(steps_before, steps_after))  # Adam did not count it
    assert trainer.state.ema.num_updates == 1
    assert torch.isfinite(torch.tensor(trainer.train_step()["loss"])) and trainer.nonfinite_in_a_row == 0


def test_clipping_on_the_device_matches_clipping_on_the_host(tmp_path):
    """The fused AdamW divides by the inverse clipping factor on the device; the host path multiplies the
    gradients by the factor first (as megatron does). Both must give the same weights."""
    from dfmkit.train.optim import main_grad_norm

    weights = []
    for fused in (True, False):
        torch.manual_seed(0)
        trainer = Trainer(dfmkit.build(tiny_recipe(tmp_path / str(fused), optim={"clip_grad": 0.05})))
        for _, inner in torch_adams(trainer.state.optimizer):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = fused, not fused
        for _ in range(3):
            metrics = trainer.train_step()
        assert metrics["grad_norm"] > 0.05  # clipping did something
        optimizer = trainer.state.optimizer
        optimizer.prepare_grads()
        grad_norm = main_grad_norm(optimizer)
        assert float(grad_norm) == pytest.approx(optimizer.get_grad_norm(), rel=1e-6)  # megatron's own count
        weights.append([p.detach().clone() for p in trainer.state.model.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_validation_writes_loss_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # A large learning rate moves the EMA well away from the raw weights, so that sampling with the wrong ones shows.
    recipe = tiny_recipe(tmp_path / "val", train={"train_iters": 2}, optim={"warmup_iters": 1, "lr": 3e-2},
                         validation={"interval": 2, "prompts": ["a handwritten digit 3", "a handwritten digit 7"],
                                     "height": 8, "width": 8, "loss_batches": 1, "loss_sigmas": [0.5, 2.0],
                                     "guidance": 2.0})
    train(dfmkit.build(recipe))
    step_dir = tmp_path / "val" / "validation_generation" / "step_2"
    assert sorted(p.name for p in step_dir.iterdir()) == ["000.json", "000.png", "001.json", "001.png"]
    settings = json.loads((step_dir / "001.json").read_text())
    assert settings["prompt"] == "a handwritten digit 7" and settings["step"] == 2 and settings["weights"] == "ema"
    assert settings["num_steps"] == 4  # the sampler's steps (was null: read from the sampler, not its options)
    assert settings["sampler"] == {"name": "edm-euler", "num_steps": 4}
    assert settings["objective"]["name"] == "edm" and settings["objective"]["sigma_max"] == 80.0
    assert settings["guidance"] == 2.0 and settings["latent_shape"] == [3, 1, 8, 8]
    events = EventAccumulator(str(tmp_path / "val" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"val/loss_sigma_0.5", "val/loss_sigma_2", "val/loss_mean", "train/loss", "train/lr"} <= set(scalars)
    assert len(events.Tags()["images"]) == 2

    # Validation samples with the code of `dfmkit generate`: the same prompts, sizes, seed and sampler from
    # the checkpoint saved at that step (whose EMA weights validation used) give the same files.
    generated = tmp_path / "generated"
    load(tmp_path / "val").generate(recipe["validation"]["prompts"], out=generated)
    for index in range(2):
        np.testing.assert_array_equal(np.asarray(Image.open(step_dir / f"00{index}.png")),
                                      np.asarray(Image.open(generated / f"00{index}.png")))
        ours = json.loads((step_dir / f"00{index}.json").read_text())
        theirs = json.loads((generated / f"00{index}.json").read_text())
        shared = ("index", "prompt", "seed", "base_seed", "height", "width", "frames", "latent_shape", "sampler",
                  "num_steps", "guidance", "weights", "file")
        assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
        assert ours["seed"] == ours["base_seed"] + index


def test_validation_skips_non_finite_samples_with_a_warning_and_training_goes_on(tmp_path, caplog):
    """EMA weights that hold NaN make NaN samples: validation writes and logs none of them (no black images), says so
    in a warning naming them, and training goes on."""
    recipe = tiny_recipe(tmp_path / "val", train={"train_iters": 2}, optim={"warmup_iters": 1},
                         validation={"interval": 1, "prompts": ["a handwritten digit 3", "a handwritten digit 7"],
                                     "height": 8, "width": 8, "loss_batches": 0})
    trainer = Trainer(dfmkit.build(recipe))
    for shadow in trainer.state.ema.shadow:
        shadow.fill_(float("nan"))  # stays NaN through the EMA updates
    with caplog.at_level("WARNING", logger="dfmkit"):
        result = trainer.train()
    assert result["step"] == 2
    folder = tmp_path / "val" / "validation_generation"
    assert not folder.exists() or not any(folder.rglob("*.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "val" / "tensorboard"))
    events.Reload()
    assert events.Tags()["images"] == [] and "train/loss" in events.Tags()["scalars"]  # nothing black is logged either
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "NaN" in r.getMessage()]
    assert len(warnings) == 2  # one per validation (steps 1 and 2)
    assert warnings[1].startswith("step 2: validation outputs 0 ('a handwritten digit 3'), 1 ('a handwritten digit 7') "
                                  "hold NaN or inf: not written, training goes on; likely cause: weights that hold NaN")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_validation_replays_graphs_by_default_with_the_eager_samples(tmp_path, monkeypatch):
    """On a GPU, validation generation replays CUDA graphs by default: inside the training run (the DDP-wrapped
    model, the EMA weights swapped in, the loader's threads alive) each validation captures its pack once, and its
    latents are those of sampling eagerly (validation.cuda_graphs = false) with the same weights, within bf16
    noise."""
    import attrs

    from dfmkit.generation.graphs import GraphedDenoiser
    from dfmkit.generation.sampling import SamplingModel

    recipe = tiny_recipe(tmp_path / "val", train={"train_iters": 2}, optim={"warmup_iters": 1, "lr": 3e-2},
                         validation={"interval": 1, "prompts": ["a handwritten digit 3", "a 7", "an 8"],
                                     "height": 8, "width": 8, "loss_batches": 1, "guidance": 3.0})
    trainer = Trainer(dfmkit.build(recipe))
    validator = trainer.validator
    assert trainer.device.type == "cuda" and trainer.model_dtype == torch.bfloat16 and validator.config.cuda_graphs
    captures, latents = [], []
    init, sample = GraphedDenoiser.__init__, SamplingModel.sample

    def counted(self, *args, **kwargs):
        captures.append(1)
        init(self, *args, **kwargs)

    def recorded(self, *args, **kwargs):
        latents.append(sample(self, *args, **kwargs))
        return latents[-1]

    monkeypatch.setattr(GraphedDenoiser, "__init__", counted)
    monkeypatch.setattr(SamplingModel, "sample", recorded)
    assert trainer.train()["step"] == 2
    assert len(captures) == 2 and len(latents) == 2  # one pack at each of the two validations
    assert trainer.train_step()["loss"] > 0  # training goes on after the graphs were freed
    validator.run(3)  # the EMA moved by one more step: sample with graphs and eagerly with these weights
    validator.config = attrs.evolve(validator.config, cuda_graphs=False)
    validator.run(3)
    assert len(captures) == 3 and len(latents) == 4
    for got, want in zip(latents[2], latents[3]):
        assert got.isfinite().all() and want.isfinite().all()
        assert (got - want).abs().max() <= 1e-2 * want.abs().max(), (got - want).abs().max()
    assert not torch.equal(latents[1][0], latents[2][0])  # the extra step changed the EMA weights


def _opaque_plugins():
    import attrs

    from dfmkit.components.tokenizers.identity import IdentityOptions, build as build_identity
    from dfmkit.hookspecs import hookimpl
    from dfmkit.plugins import PluginManager

    options = attrs.define(kw_only=True)(type("OpaqueTokenizerOptions", (), {"__doc__": "No latent_shape."}))

    class Opaque:
        @hookimpl
        def dfmkit_register(self, registries):
            registries.tokenizer.register("opaque", lambda _, **c: build_identity(IdentityOptions(), **c),
                                          options=options)

    return PluginManager(extra=[(Opaque(), "opaque-dist 1.0")])


def test_validation_size_that_does_not_fit_is_the_error_of_generate(tmp_path):
    """A validation size whose latent does not divide into the patches gives the message `dfmkit generate` gives
    that size (naming the nearest sizes that fit): when the recipe is read where the tokenizer's options can tell,
    else when the trainer builds the tokenizer, before any step."""
    sizes = {"interval": 1, "prompts": ["a digit"], "height": 9, "width": 8}
    job = dfmkit.build(tiny_recipe(tmp_path / "ok"))
    tokenizer = job.components["tokenizer"].build(recipe=job.recipe)
    with pytest.raises(GenerateError) as generate_error:
        latent_shape_for(tokenizer, job.recipe.model.options.patch_spatial, job.recipe.model.options.patch_temporal,
                         1, 9, 8, "identity")
    assert "height 9 -> 8 or 10" in str(generate_error.value)
    with pytest.raises(RecipeError) as recipe_error:
        dfmkit.build(tiny_recipe(tmp_path / "val", validation=sizes))
    assert recipe_error.value.problems == [f"validation.height: {generate_error.value}"]

    opaque = dfmkit.build(tiny_recipe(tmp_path / "opaque", validation=sizes, tokenizer={"name": "opaque"}),
                          plugins=_opaque_plugins())
    with pytest.raises(GenerateError) as validation_error:
        Trainer(opaque)
    expected = str(generate_error.value).replace("'identity' tokenizer", "'opaque' tokenizer")
    assert str(validation_error.value) == f"validation.frames/height/width: {expected}"


def test_bad_input_fails_before_any_work(tmp_path):
    with pytest.raises(RecipeError, match="data.path: dataset folder '.*nowhere' does not exist"):
        Trainer(dfmkit.build(tiny_recipe(tmp_path / "x", data={"mock": False, "path": str(tmp_path / "nowhere")})))
    with pytest.raises(RecipeError, match="warmup_iters \\(2000\\) must be smaller than train.train_iters"):
        Trainer(dfmkit.build(tiny_recipe(tmp_path / "x", optim={"warmup_iters": 2000})))
    # Validation sizes that do not fit the patches: refused when the recipe is read, not at the first validation.
    with pytest.raises(RecipeError, match="validation.height: size 1 frames x 9 x 8 .* height 9 -> 8 or 10"):
        dfmkit.build(tiny_recipe(tmp_path / "x", validation={"interval": 2, "prompts": ["a"], "height": 9, "width": 8}))
    # Validation sizes whose generation cannot fit in memory: refused before the first step, not at the first
    # validation (which would be killed, or fail, after the steps before it).
    huge = tiny_recipe(tmp_path / "huge", validation={"interval": 2, "prompts": ["a", "b"], "height": 2**30, "width": 8})
    with pytest.raises(GenerateError, match=r"^validation generation: this request needs at least .* GiB of memory .* "
                                            r"lower validation.height/width/frames \(now 1073741824 x 8 x 1 frames\) "
                                            r"or give fewer validation.prompts \(now 2\)$"):
        Trainer(dfmkit.build(huge))
    assert not (tmp_path / "huge").exists() or not any((tmp_path / "huge").rglob("iter_*"))


def test_a_run_says_what_it_is_about_to_do(tmp_path, caplog):
    """The first line of a run: model and size, objective, processes and layout, steps (from where a resumed run
    goes on) and micro-batches per step (a step of many shows no progress until it ends), checkpoint folder."""
    recipe = tiny_recipe(tmp_path / "ck", train={"train_iters": 4, "global_batch_size": 3, "device": "cpu"})
    with caplog.at_level("INFO", logger="dfmkit"):
        train(dfmkit.build(recipe), until_step=2)
        train(dfmkit.build(recipe))
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training ")]
    parameters = sum(p.numel() for p in Trainer(dfmkit.build(recipe)).state.model.parameters())
    assert plans == [
        f"training dit ({parameters / 1e6:.1f}M parameters, float32) as edm on 1 process on cpu (data 1 x tensor 1 x "
        f"context 1): {steps} of 3 micro-batches per rank, each a pack of up to 64 tokens; checkpoints in "
        f"{tmp_path / 'ck'}" for steps in ("2 steps", "steps 3 to 4")]


def test_a_set_up_failure_on_one_rank_ends_every_rank(tmp_path):
    """Validation sizes that cannot fit are refused on the ranks that generate (data-parallel group 0) only. Every
    rank learns of it at set-up and ends with the message, instead of going on into the first gradient all-reduce
    to wait for rank 0 until the collective's timeout. Two processes started without torchrun, whose agent would
    otherwise end the waiting rank itself."""
    recipe = tiny_recipe(tmp_path / "ck", validation={"interval": 2, "prompts": ["a"], "height": 2**30, "width": 8})
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"recipe": recipe, "out": str(tmp_path / "out.json")}))
    port = str(_free_port())
    processes = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "CUDA_VISIBLE_DEVICES": ""}
        log = open(tmp_path / f"rank{rank}.log", "w")
        processes.append((subprocess.Popen([sys.executable, str(WORKER), str(config)], stdout=log,
                                           stderr=subprocess.STDOUT, env=env, start_new_session=True), log))
    try:
        codes = [process.wait(timeout=180) for process, _ in processes]
    finally:
        for process, log in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            log.close()
    logs = [(tmp_path / f"rank{rank}.log").read_text() for rank in range(2)]
    assert codes == [2, 2], logs
    assert "error: validation generation: this request needs at least" in logs[0]
    assert ("error: rank 0 could not set up the run (1 of 2 ranks failed), so this rank stops too: validation "
            "generation: this request needs at least") in logs[1]


def test_a_missing_dataset_is_prepared_from_its_source(tmp_path):
    path = tmp_path / "digits"
    recipe = tiny_recipe(tmp_path / "ck", data={"mock": False, "path": str(path), "prepare_source": "digits",
                                                "image_size": 16, "seq_length": 256, "num_workers": 0},
                         model={"patch_spatial": 4}, train={"train_iters": 2}, optim={"warmup_iters": 1})
    result = train(dfmkit.build(recipe))
    assert (path / "dfmkit.json").is_file()
    assert json.loads((path / "dfmkit.json").read_text())["samples"]["train"] > 1000
    assert result["step"] == 2 and all(torch.isfinite(torch.tensor(result["losses"])))


def test_resume_may_change_how_the_model_is_computed_but_not_what_it_is(tmp_path):
    """The backbone's options marked COMPUTATION_ONLY (DiT: attention, recompute, compile, fused_kernels, cuda_graphs,
    use_cpu_initialization) may change on resume; a size may not, and the refusal names it."""
    train(dfmkit.build(tiny_recipe(tmp_path / "ck", train={"train_iters": 3})))
    computed_otherwise = tiny_recipe(tmp_path / "ck", model={"fused_kernels": False, "recompute": "full"},
                                     train={"train_iters": 4})
    resumed = train(dfmkit.build(computed_otherwise))
    assert resumed["step"] == 4 and len(resumed["losses"]) == 1 and np.isfinite(resumed["losses"][0])
    compiled = tiny_recipe(tmp_path / "ck", train={"train_iters": 5},
                           model={"compile": True, "cuda_graphs": True, "use_cpu_initialization": True})
    assert Trainer(dfmkit.build(compiled)).state.step == 4  # loaded (a compiled step on the CPU would only be slow)

    other = tiny_recipe(tmp_path / "ck", model={"num_layers": 3, "fused_kernels": False}, train={"train_iters": 5})
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit the model of this recipe "
                                                     r"\(model.num_layers: checkpoint 0, recipe 3\)"):
        Trainer(dfmkit.build(other))


def test_megatron_multi_tensor_fallbacks_give_the_same_norm_and_scaling():
    """Without Apex/TransformerEngine megatron's grad norm syncs with the host once per parameter; dfmkit
    swaps in torch's foreach kernels. They must compute what megatron's fallbacks compute: the fp32 norm
    of all tensors together (mixed precisions), and ``destination = source * scale``, in place or not."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    from dfmkit.compat import megatron_optimizer as optim

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g) for n in (3, 70, 1)] + [torch.randn(5, 4, generator=g).bfloat16()]
    norm, _ = optim._foreach_l2_norm(0, None, [tensors], False)
    assert norm.shape == (1,) and norm.dtype == torch.float32
    expected = torch.linalg.vector_norm(torch.cat([t.float().flatten() for t in tensors]))
    torch.testing.assert_close(norm[0], expected, rtol=1e-6, atol=0)

    sources = [t.float() for t in tensors]
    copies = [torch.empty_like(t) for t in tensors]
    optim._foreach_scale(0, None, [sources, copies], 0.5)
    in_place = [t.clone() for t in tensors]
    optim._foreach_scale(0, None, [in_place, in_place], 0.5)
    for source, tensor, copy, scaled in zip(sources, tensors, copies, in_place):
        torch.testing.assert_close(copy, (source * 0.5).to(tensor.dtype), rtol=0, atol=0)
        torch.testing.assert_close(scaled, tensor * 0.5, rtol=0, atol=0)

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:  # megatron without Apex/TE: replaced
        assert optim.use_foreach_multi_tensor_ops()
        assert clip_grads.l2_norm_impl is optim._foreach_l2_norm


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("in_one_buffer", [False, True])
def test_ema_averages_bf16_weights_in_fp32(in_one_buffer, device):
    """The EMA keeps fp32 shadows of (here bf16) weights: shadow <- d * shadow + (1 - d) * weight, with
    the warm-up decay min(d, (1 + n) / (10 + n)) at update n. Weights that are views of one buffer (as
    megatron's DDP lays them out, with gaps) are averaged as one span. On CUDA the update is compiled."""
    from dfmkit.train.ema import EMA

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).bfloat16().to(device)
    if in_one_buffer:
        buffer = torch.zeros(64, dtype=torch.bfloat16, device=device)
        offset = 5
        for param in model.parameters():
            view = buffer[offset : offset + param.numel()].view(param.shape)
            view.copy_(param.data)
            param.data = view
            offset += param.numel() + 3
    ema = EMA(model, decay=0.9)
    assert len(ema._spans) == (1 if in_one_buffer else 4)
    expected = [p.detach().double() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    for n in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).bfloat16().to(device))
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.detach().double() for e, p in zip(expected, model.parameters())]
        ema.update(torch.zeros((), device=device) if n % 2 else None)  # a device flag of 0 updates like no flag
        ema.num_updates += 1 if n % 2 else 0  # with a flag, the caller counts
    for shadow, want in zip(ema.shadow, expected):
        assert shadow.dtype == torch.float32
        torch.testing.assert_close(shadow.double(), want, rtol=1e-6, atol=1e-6)
    before = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(torch.ones((), device=device))  # a skipped step leaves the average as it is
    assert all(torch.equal(a, b) for a, b in zip(before, ema.shadow)) and ema.num_updates == 5


@pytest.mark.parametrize("compiled", [False, True])
def test_batched_gradient_accumulation_leaves_megatrons_main_grads(compiled):
    """BatchedAccumulationDDP keeps each gradient and adds a DiT layer's (or another module's) at once, compiled
    when asked (as on CUDA): over two backward passes the fp32 main_grad buffer is bit for bit what megatron's
    per-parameter hooks leave, nothing is left kept, and each kind of group ran the one graph compiled for it
    when the DDP was built (the gradients arrive in another order than the parameters')."""
    import dit_harness as H
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from dfmkit.components.backbones import dit
    from dfmkit.compat.megatron_ddp import BatchedAccumulationDDP

    torch.manual_seed(0)
    model = dit.build(H.tiny_options())  # megatron's DDP keeps its buffers on the GPU when there is one
    device = next(model.parameters()).device
    H.randomize_(model)
    buffers = {}
    for cls in (DistributedDataParallel, BatchedAccumulationDDP):
        copy = dit.build(H.tiny_options())
        copy.load_state_dict(model.state_dict())
        ddp = cls(copy.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), copy)
        if cls is BatchedAccumulationDDP:
            assert len(ddp._groups) == 2 + 3 and len(ddp._groups["decoder.layers.0"]) == 13  # 2 layers, 3 modules
            if compiled:  # as on CUDA, where the DDP has compiled them already
                ddp._compile_adds()
            else:
                ddp._adds.clear()
        ddp.zero_grad_buffer()
        for seed, batch in enumerate(H.make_packs()[:2]):
            x, c_noise, target = (t.to(device) for t in H.pack_inputs(batch, seed))
            (ddp(x, c_noise, batch.to(device)) * target).sum().backward()
        if cls is BatchedAccumulationDDP:
            assert not ddp._kept
            if compiled:  # one graph per kind of group, the one compiled up front: the two layers share theirs
                from torch._dynamo.eval_frame import _debug_get_cache_entry_list

                kinds = {id(adds): adds for adds in ddp._adds.values()}
                assert len(kinds) == 4
                for adds in kinds.values():
                    assert len(_debug_get_cache_entry_list(adds._torchdynamo_orig_callable.__code__)) == 1
        buffers[cls] = torch.cat([b.grad_data for b in ddp.buffers])
        assert buffers[cls].abs().sum() > 0
    assert torch.equal(buffers[DistributedDataParallel], buffers[BatchedAccumulationDDP])


def test_batched_adds_do_not_start_a_cuda_graph_step():
    """A torch.compile'd call advances dynamo's generation count, which inductor's CUDA graph trees take for a new
    step (and then the graphed backward's outputs still in use for overwritten); the batched adds, called inside
    the backward, put it back, and still add."""
    from torch._dynamo.mutation_guard import GenerationTracker

    from dfmkit.compat import megatron_ddp

    mains, grads = [torch.zeros(3), torch.zeros(2, 2)], [torch.ones(3).bfloat16(), torch.ones(2, 2).bfloat16()]
    adds = megatron_ddp.compile_adds()
    adds(mains, grads)  # compiled (and its generation step taken) here
    before = GenerationTracker.generation
    adds(mains, grads)
    assert GenerationTracker.generation != before
    before = GenerationTracker.generation
    megatron_ddp.add_within_the_step(adds, mains, grads)
    assert GenerationTracker.generation == before
    assert torch.equal(mains[1], torch.full((2, 2), 3.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_distributed_optimizer_writes_its_master_weights_into_the_model(tmp_path):
    """megatron's distributed optimizer (on by default on CUDA) with dfmkit's multi-tensor copy of its fp32 master
    weights (compat.megatron_optimizer.copy_main_params_with_foreach): after two steps every model weight is its
    master weight rounded to the model's dtype, and the weights have moved."""
    from dfmkit.compat.megatron_optimizer import copy_main_params_with_foreach

    trainer = Trainer(dfmkit.build(tiny_recipe(tmp_path)))
    assert copy_main_params_with_foreach(trainer.state.optimizer) >= 1
    before = {name: p.detach().clone() for name, p in trainer.state.model.named_parameters()}
    for _ in range(2):
        trainer.train_step()
    pairs = 0
    for opt in getattr(trainer.state.optimizer, "chained_optimizers", [trainer.state.optimizer]):
        for main_groups, model_groups in ((opt.shard_fp32_from_float16_groups, opt.model_float16_groups),
                                          (opt.shard_fp32_groups, opt.model_fp32_groups)):
            for main_group, model_group in zip(main_groups, model_groups):
                for main, model in zip(main_group, model_group):
                    assert torch.equal(model.detach().view(-1), main.detach().view(-1).to(model.dtype))
                    pairs += 1
    assert pairs == len(before)
    assert any(not torch.equal(before[name], p) for name, p in trainer.state.model.named_parameters())


def test_dfmkit_run_sums_the_skipped_samples_of_every_data_parallel_rank(tmp_path):
    """Each data-parallel rank's loader counts the bad samples of its own part: the summary of `dfmkit run` (and the
    checkpoint) hold the sum over the ranks, not rank 0's part."""
    from test_data_harness import index_dataset, members, run_recipe, write_info, write_raw

    nan = torch.full((3, 1, 8, 8), float("nan"))
    for shard in range(2):  # one shard a rank, every 4th sample NaN: 2 bad samples in each part
        keys = range(shard * 8, shard * 8 + 8)
        write_raw(tmp_path / f"train-{shard}-000000.tar",
                  [(f"{k:09d}", members(k, lat=nan if k % 4 == 0 else None)) for k in keys])
    write_info(tmp_path)
    index_dataset(tmp_path)
    recipe = run_recipe(tmp_path, tmp_path / "ck", train_iters=2).replace("global_batch_size = 1",
                                                                         "global_batch_size = 2")
    (tmp_path / "run.toml").write_text(recipe)
    code, output = run_cli(tmp_path, ["run", str(tmp_path / "run.toml")], "dp", nproc=2)
    assert code == 0, output[-3000:]
    assert "data: 4 skipped (nonfinite 4)" in output.splitlines()
    assert ckpt.read_marker(ckpt.find_checkpoint(tmp_path / "ck"))["skipped_samples"] == {"nonfinite": 4}
