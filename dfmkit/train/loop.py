"""The training loop of ``dfmkit run``: the Trainer's step and loop, reading top to bottom.

A run is put together from one piece a module: the device, micro-batches and dataset
(:mod:`dfmkit.train.setup`), the checkpointable state of model, DDP, optimizer, schedule, EMA and counters
(:mod:`dfmkit.train.state`), resuming a checkpoint (:mod:`dfmkit.train.resume`), the gradients of a step
(:mod:`dfmkit.train.step`), logging (:mod:`dfmkit.train.logger`) and validation (:mod:`dfmkit.train.validation`).

One optimizer step consumes ``train.global_batch_size`` packed sequences: each data-parallel rank runs
``global_batch_size / dp`` micro-batches (one packed sequence each) and accumulates gradients.

The host never waits for the GPU inside a step, but once after the backward: the gradient norm, the
clipping and the skip of a non-finite step are decided on the device (see
:func:`dfmkit.train.optim.step_on_device`), the optimizer and EMA kernels are queued, and only then does
the host read the step's loss, norm and flags, while the GPU works through the queue.

Where a run stops: at ``train.train_iters`` (or ``until_step``), after ``train.max_nonfinite_steps`` non-finite
steps in a row (:class:`TrainingStopped`, after a save), or on SIGTERM/SIGINT, within seconds wherever it waits
(:mod:`dfmkit.train.stopping`): a signal during a step lets the step finish, and every rank saves the state after it;
a signal while a rank waits for its next batches stops the wait (with several processes after a few seconds' grace,
so that slow data still joins a step another rank began) and the ranks save the state of the last step they all
completed, the data at that step's end, if all stopped so; else the run ends without a save
(:class:`~dfmkit.train.stopping.StoppedWithoutSaving`, naming the last complete checkpoint). Saves:
:meth:`Trainer.save`.
"""

from __future__ import annotations

import logging
import time
import tomllib
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist

from dfmkit import parallel
from dfmkit.data.loader import WORKER_ANSWER_S, build_train_loader
from dfmkit.data.skips import REASONS
from dfmkit.diffusion.objective import as_model_fn
from dfmkit.errors import DfmkitError
from dfmkit.job import Job
from dfmkit.processes import children_die_with_this_process
from dfmkit.recipe import dump_recipe
from dfmkit.train import checkpoint as ckpt
from dfmkit.train.logger import MetricsLogger
from dfmkit.train.optim import check_schedule, step_on_device
from dfmkit.train.resume import resume
from dfmkit.train.setup import ensure_dataset, micro_batches_per_rank, on_every_rank, training_device
from dfmkit.train.state import build_train_state
from dfmkit.train.step import compute_gradients, step_generator
from dfmkit.train.stopping import (
    DATA_GRACE_S,
    DataWaitInterrupted,
    StopSignals,
    StoppedWithoutSaving,
    all_ranks_stopped,
    stop_group,
)
from dfmkit.train.validation import Validator, ema_evaluation

log = logging.getLogger("dfmkit")


class TrainingStopped(DfmkitError):
    """Training stopped early on purpose (too many non-finite losses); the state was saved."""


class DeviceFigures:
    """A step's figures, copied from the device to the host behind an event: reading them waits for the
    kernels that made them, not for everything queued after (``.item()`` would empty the whole queue)."""

    def __init__(self, values: torch.Tensor):
        self.event = None
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values

    def read(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class Trainer:
    """A training run. ``Trainer(job).train()`` runs to ``train.train_iters`` or a stop signal.

    ``state`` (:class:`~dfmkit.train.state.TrainState`) holds what a checkpoint holds: model, DDP, optimizer,
    schedule, EMA, and the counters (``state.step``)."""

    def __init__(self, job: Job, *, mock: bool = False, data: Any = None):
        """``mock``: train on mock data whatever ``data.mock`` says. ``data``: an iterator of PackedBatch to train on
        instead of the recipe's loader (benchmarks, tests); it may offer ``save_state()``/``restore_state()``,
        ``position()``/``rewind()`` and ``skips`` like the loader (a stop that interrupts a step's batches saves only
        data that can go back to the step's start)."""
        children_die_with_this_process()  # loader workers, checkpoint writers: nothing outlives a killed run
        if mock and not job.recipe.data.mock:
            job = Job(attrs.evolve(job.recipe, data=attrs.evolve(job.recipe.data, mock=True)), job.plugins)
        self.job = job
        recipe = self.recipe = job.recipe
        self.device, self.model_dtype = training_device(recipe.train)
        check_schedule(recipe.optim, recipe.train.train_iters)
        if data is None:
            ensure_dataset(recipe, job.plugins)
        self.env = parallel.initialize(recipe.parallel, self.device)
        self.micro_batches = micro_batches_per_rank(recipe.train, self.env)
        self.pad_multiple = parallel.required_pad_multiple(recipe.parallel)
        self.state = build_train_state(job, recipe, self.env, self.device, self.model_dtype)
        self.objective = job.components["diffusion"].build(recipe=recipe)
        self._stop_group = stop_group()
        if data is None:  # a rank's data may be missing or broken where the others' is not
            data = on_every_rank(lambda: build_train_loader(job, dp_rank=self.env.dp_rank, dp_size=self.env.dp_size,
                                                            pad_multiple=self.pad_multiple), self._stop_group)
        self.data = data
        self.nonfinite_in_a_row = 0
        self.stop = StopSignals(grace=0.0 if self.env.world_size == 1 else DATA_GRACE_S)
        self.stop_requested = False  # a stop signal reached some rank by the last step (all ranks know it)
        self.checkpoint_dir = Path(recipe.checkpoint.dir)
        resume(self.state, self.data, recipe, job.plugins.registries, self.env)
        self.saved_step = self.state.step  # the step whose state a checkpoint holds (a fresh run's step 0 needs none)
        self.logger = MetricsLogger(recipe.logging, str(self.checkpoint_dir), self._run_config(),
                                    enabled=self.env.rank == 0, total_steps=recipe.train.train_iters,
                                    start_step=self.state.step)
        # Data-parallel group 0 prepares the validation prompts and checks their sizes alone.
        self.validator = on_every_rank(self._build_validator, self._stop_group) if recipe.validation.interval else None

    def _build_validator(self) -> Validator:
        state = self.state
        return Validator(self.job, model=state.model, model_fn=as_model_fn(state.ddp, self.device, self.model_dtype),
                         ema_weights=lambda: ema_evaluation(state.model, state.ema), env=self.env, device=self.device,
                         model_dtype=self.model_dtype, pad_multiple=self.pad_multiple,
                         out_dir=self.checkpoint_dir / "validation_generation", logger=self.logger)

    def skipped_samples(self) -> dict[str, int]:
        """The samples skipped so far by reason, summed over the data-parallel ranks (each rank's loader counts its
        own part of the data; tensor- and context-parallel peers read the same part). Every rank must call it."""
        skips = getattr(self.data, "skips", None)
        mine = skips.as_dict() if skips is not None else {}
        counts = torch.tensor([mine.get(reason, 0) for reason in REASONS], dtype=torch.int64, device=self.device)
        if self.env.dp_size > 1:
            dist.all_reduce(counts, group=parallel.data_parallel_group())
        return {reason: n for reason, n in zip(REASONS, counts.tolist()) if n}

    def _run_config(self) -> dict[str, Any]:
        return tomllib.loads(dump_recipe(self.recipe, registries=self.job.plugins.registries))

    def save(self) -> Path:
        """A checkpoint at the current step: the state, and per rank the RNG states and the data position."""
        marker = {
            "recipe": dump_recipe(self.recipe, registries=self.job.plugins.registries),
            "model": self.recipe.model.name,
            "parallel": {"tensor": self.env.tp_size, "context": self.env.cp_size, "data": self.env.dp_size},
            "skipped_samples": self.skipped_samples(),
        }
        loader = None
        if hasattr(self.data, "save_state"):
            try:  # the loader's worker processes say where they are between samples: one may be stuck in a read
                with self.stop.waiting_for_data(grace=WORKER_ANSWER_S):
                    loader = self.data.save_state()
            except DataWaitInterrupted:
                raise StoppedWithoutSaving(
                    f"stopped by {self.stop.name} while the data loader was asked for its position at step "
                    f"{self.state.step} (a worker process stuck in a read does not answer): not saved. "
                    f"{self._last_checkpoint()}") from None
        rank_state = {"rng": ckpt.rng_state(), "loader": loader}
        saved = self.state.save(self.checkpoint_dir, marker, rank_state, self.recipe.checkpoint.keep_last)
        self.saved_step = self.state.step
        return saved

    # -- one step --------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step (or a skipped one); returns its loss, gradient norm, learning rate, samples, tokens."""
        state = self.state
        with self.stop.waiting_for_data():
            batches = [next(self.data) for _ in range(self.micro_batches)]
        generators = [step_generator(self.recipe.train.seed, state.step, micro, self.env.dp_rank, self.device)
                      for micro in range(len(batches))]
        grads = compute_gradients(state, self.objective, batches, generators, env=self.env, device=self.device,
                                  model_dtype=self.model_dtype)
        # Every rank must agree to skip a step (non-finite loss or gradients) and to stop, so both flags are
        # reduced over all ranks; the stop request rides along to save a collective.
        signalled = 1.0 if self.stop.received is not None else 0.0
        flags = torch.stack([(~torch.isfinite(grads.loss_total)).float(),
                             (~torch.isfinite(grads.grad_norm)).float(),
                             torch.full((), signalled, device=self.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skip = flags[:2].amax()
        figures = DeviceFigures(torch.stack([grads.loss_total / grads.count, grads.grad_norm, skip, flags[2]]))
        # Launched before the host reads the figures: the GPU works through the optimizer and the EMA while
        # the host prepares the next step. The skip decision is made on the device.
        step_on_device(state.optimizer, self.recipe.optim.clip_grad, grads.grad_norm, skip, grad_divisor=grads.count)
        state.ema.update(skip)

        loss, grad_norm, skipped, stop = figures.read()
        state.step += 1
        state.consumed_sequences += self.recipe.train.global_batch_size
        self.stop_requested = stop > 0
        if skipped:
            state.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            return {"loss": float("nan"), "skipped_nonfinite": 1.0}
        self.nonfinite_in_a_row = 0
        state.ema.num_updates += 1
        lr = state.optimizer.param_groups[0]["lr"]
        state.scheduler.step(1)
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "samples": float(sum(b.num_samples for b in batches)),
            "tokens": float(sum(int(b.seqlens.sum()) for b in batches)),
        }

    # -- the loop --------------------------------------------------------------------------

    def _last_checkpoint(self) -> str:
        found = ckpt.find_checkpoint(self.checkpoint_dir)
        if found is None:
            return f"There is no complete checkpoint in {self.checkpoint_dir} yet."
        return (f"The last complete checkpoint is {found} (step {ckpt.read_marker(found).get('iteration')}); a run "
                "started again resumes from it.")

    def _stop_at_the_step_start(self, position: Any) -> None:
        """A stop signal cut the wait for the next step's batches short: the data goes back to where the step began,
        and every rank must have stopped so (:mod:`dfmkit.train.stopping`), or StoppedWithoutSaving."""
        where = f"stopped by {self.stop.name} while waiting for the batches of step {self.state.step + 1}"
        try:
            if position is not None:
                self.data.rewind(position)
            elif hasattr(self.data, "save_state"):
                raise ValueError(f"{type(self.data).__name__} has no rewind()")
        except Exception as exc:
            raise StoppedWithoutSaving(f"{where}; its data could not go back to the start of the step ("
                                       f"{type(exc).__name__}: {exc}): not saved. {self._last_checkpoint()}") from None
        if not all_ranks_stopped(self._stop_group):
            raise StoppedWithoutSaving(f"{where}, while another rank was inside that step, waiting for this one: not "
                                       f"saved. {self._last_checkpoint()}")

    def train(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to ``train.train_iters``, or stop (and save) after ``until_step`` like a preempted run."""
        state = self.state
        if self.env.rank == 0:
            log.info(self.plan(until_step))
        try:
            with self.stop:
                history, grad_norms = self._loop(until_step)
        except Exception as exc:
            if self.stop.received is None or self.env.world_size == 1 or isinstance(exc, DfmkitError):
                raise
            # A rank inside a step whose peer stopped without it: the step's collective fails when the peer exits.
            gist = (str(exc).strip().splitlines() or [""])[-1][:200]
            raise StoppedWithoutSaving(f"stopped by {self.stop.name} during step {state.step + 1}, which another rank "
                                       f"left ({type(exc).__name__}: {gist}): not saved. {self._last_checkpoint()}"
                                       ) from None
        finally:
            self.logger.close()
        stopped = (self.stop_requested or self.stop.received is not None) and state.step < self._last_step(until_step)
        if stopped and self.env.rank == 0:
            log.info("stopped by %s at step %d; %s", self.stop.name if self.stop.received else
                     "a signal on another rank", state.step, f"saved to {self.checkpoint_dir}" if state.step else
                     "nothing to save before the first step")
        skipped = self.skipped_samples()
        parallel.barrier()
        return {"step": state.step, "losses": history, "grad_norms": grad_norms,
                "checkpoint_dir": str(self.checkpoint_dir), "stopped_by_signal": stopped, "skipped_samples": skipped}

    def plan(self, until_step: int | None = None) -> str:
        """One line of what :meth:`train` is about to do: the model and objective, the processes and their layout,
        a step's micro-batches, the steps, and where checkpoints go. A step of many micro-batches shows no progress
        until it ends: this line says how many there are."""
        recipe, env = self.recipe, self.env
        parameters = sum(p.numel() for p in self.state.model.parameters())
        shard = f" ({env.tp_size}-way tensor parallel: this rank's share)" if env.tp_size > 1 else ""
        processes = f"{env.world_size} process{'es' if env.world_size > 1 else ''} on {self.device.type}"
        layout = f"data {env.dp_size} x tensor {env.tp_size} x context {env.cp_size}"
        steps = f"steps {self.state.step + 1} to {self._last_step(until_step)}" if self.state.step else \
            f"{self._last_step(until_step)} steps"
        dtype = str(self.model_dtype).removeprefix("torch.")
        return (f"training {recipe.model.name} ({parameters / 1e6:.1f}M parameters{shard}, {dtype}) as "
                f"{recipe.diffusion.name} on {processes} ({layout}): {steps} of {self.micro_batches} micro-batch"
                f"{'es' if self.micro_batches > 1 else ''} per rank, each a pack of up to {recipe.data.seq_length} "
                f"tokens; checkpoints in {self.checkpoint_dir}")

    def _last_step(self, until_step: int | None) -> int:
        return self.recipe.train.train_iters if until_step is None else min(until_step, self.recipe.train.train_iters)

    def _loop(self, until_step: int | None) -> tuple[list[float], list[float]]:
        """The steps up to ``until_step`` or a stop, and the last save; returns the losses and gradient norms."""
        recipe, state = self.recipe, self.state
        cfg = recipe.train
        history: list[float] = []
        grad_norms: list[float] = []
        window_start, window_samples, window_tokens = time.perf_counter(), 0.0, 0.0
        save_interval = recipe.checkpoint.save_interval
        while state.step < self._last_step(until_step):
            position = self.data.position() if hasattr(self.data, "rewind") else None
            try:
                metrics = self.train_step()
            except DataWaitInterrupted:
                self._stop_at_the_step_start(position)
                break
            history.append(metrics["loss"])
            grad_norms.append(metrics.get("grad_norm", float("nan")))
            window_samples += metrics.get("samples", 0.0) * self.env.dp_size
            window_tokens += metrics.get("tokens", 0.0) * self.env.dp_size
            if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                self.save()
                raise TrainingStopped(
                    f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient norm (step "
                    f"{state.step}); the state was saved to {self.checkpoint_dir}. Lower optim.lr, check the data, "
                    "or raise train.max_nonfinite_steps")
            self.logger.advance(state.step, f"loss {metrics['loss']:.4f}")
            if state.step % cfg.log_interval == 0 or state.step == cfg.train_iters:
                elapsed = time.perf_counter() - window_start
                values = {
                    "train/loss": metrics["loss"],
                    "train/lr": metrics.get("lr", float("nan")),
                    "train/grad_norm": metrics.get("grad_norm", float("nan")),
                    "train/samples_per_s": window_samples / elapsed,
                    "train/tokens_per_s": window_tokens / elapsed,
                    "train/nonfinite_steps": float(state.nonfinite_total),
                }
                values.update({f"data/skipped_{k}": float(v) for k, v in self.skipped_samples().items()})
                self.logger.scalars(state.step, values)
                self.logger.step_line(state.step, values)
                window_start, window_samples, window_tokens = time.perf_counter(), 0.0, 0.0
            if self.validator is not None and state.step % recipe.validation.interval == 0:
                self.validator.run(state.step)
            if save_interval and state.step % save_interval == 0:
                self.save()
            if self.stop_requested:
                break
        if state.step != self.saved_step:
            self.save()
        return history, grad_norms


def train(job: Job, *, mock: bool = False, until_step: int | None = None, data: Any = None) -> dict[str, Any]:
    """Train the job's recipe; returns the final step, the per-step losses and gradient norms, the checkpoint folder,
    whether a signal stopped it, and the samples skipped by reason (summed over the data-parallel ranks)."""
    return Trainer(job, mock=mock, data=data).train(until_step)
