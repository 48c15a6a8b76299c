"""The training loop of ``dfmkit run``: megatron DDP + optimizer, EDM loss on packed sequences, EMA,
checkpoints with exact resume, logging and periodic validation.

One optimizer step consumes ``train.global_batch_size`` packed sequences: each data-parallel rank
runs ``global_batch_size / dp`` micro-batches (one packed sequence each) and accumulates gradients.
The loss of a step is the mean over every sample of the global batch (or over every real token,
with ``diffusion.loss_normalization = "token"``): each rank back-propagates its sum, megatron's
``finalize_model_grads`` sums the gradients over the ranks, and the optimizer divides them by the global
count as it reads them.

The host never waits for the GPU inside a step, but once after the backward: the gradient norm, the
clipping and the skip of a non-finite step are decided on the device (see
:func:`dfmkit.train.optim.step_on_device`), the optimizer and EMA kernels are queued, and only then does
the host read the step's loss, norm and flags, while the GPU works through the queue.

Randomness of a step (noise levels, noise, condition dropout) comes from a generator seeded with
(seed, step, micro-batch, data-parallel rank), so a resumed run draws exactly what an
uninterrupted run draws.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from dfmkit.batch import PackedBatch
from dfmkit.compat.megatron_optimizer import fill_empty_adam_state
from dfmkit.devices import resolve_device, resolve_precision
from dfmkit.diffusion.edm import EDM, LossTerms, NoiseDraw, as_model_fn, loss_share
from dfmkit.errors import DfmkitError, RecipeError
from dfmkit.hookspecs import COMPUTATION_ONLY
from dfmkit.job import Job
from dfmkit.recipe import dump_recipe
from dfmkit.train import checkpoint as ckpt
from dfmkit.train.ema import EMA, ema_decay
from dfmkit.train.logger import MetricsLogger
from dfmkit.train.optim import build_optimizer, check_schedule, main_grad_norm, step_on_device

log = logging.getLogger("dfmkit")


class TrainingStopped(DfmkitError):
    """Training stopped early on purpose (too many non-finite losses); the state was saved."""


def step_generator(seed: int, step: int, micro: int, dp_rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one micro-batch's random draws: a pure function of its position in the run.

    On the training device, so the noise is drawn where it is used (drawing a 32k-token pack's noise on
    the CPU took 14 ms per step, with the GPU waiting); a GPU run therefore draws other numbers than a CPU run."""
    return torch.Generator(device=device).manual_seed(hash((seed, step, micro, dp_rank)) & 0x7FFF_FFFF_FFFF_FFFF)


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
    """Everything a run holds. ``Trainer(job).train()`` runs to ``train.train_iters`` or a stop signal."""

    def __init__(self, job: Job, *, mock: bool = False, data: Any = None):
        """``data``: an iterator of PackedBatch to train on instead of the recipe's loader (benchmarks, tests);
        it may offer ``save_state()``/``restore_state()`` and ``skips`` like the loader."""
        from dfmkit import parallel

        self.job = job
        recipe = self.recipe = job.recipe
        if mock and not recipe.data.mock:
            self.recipe = recipe = attrs.evolve(recipe, data=attrs.evolve(recipe.data, mock=True))
        self.device = resolve_device(recipe.train.device, "train.device", "use train.device=cpu")
        self.model_dtype = resolve_precision(recipe.train.precision, self.device, "train.precision")
        self.bf16 = self.model_dtype == torch.bfloat16
        check_schedule(recipe.optim, recipe.train.train_iters)
        if data is None:
            self._check_data_path()

        self.env = parallel.initialize(recipe.parallel, self.device)
        dp = self.env.dp_size
        if recipe.train.global_batch_size % dp:
            raise RecipeError([
                f"train.global_batch_size ({recipe.train.global_batch_size}) must be divisible by the "
                f"data-parallel size {dp} (= {self.env.world_size} processes / tensor {self.env.tp_size} / "
                f"context {self.env.cp_size}); a micro-batch is one packed sequence"
            ])
        self.micro_batches = recipe.train.global_batch_size // dp
        self.pad_multiple = parallel.required_pad_multiple(recipe.parallel)

        torch.manual_seed(recipe.train.seed)
        parallel.seed_model_parallel(recipe.train.seed)
        self.model = job.components["model"].build(recipe=recipe).to(self.device)
        if self.bf16:
            self.model.to(torch.bfloat16)
        self.model_options = recipe.model.options
        self.edm = EDM.from_config(recipe.diffusion)

        from megatron.core.distributed import DistributedDataParallelConfig

        from dfmkit.compat.megatron_ddp import BatchedAccumulationDDP

        distributed_optimizer = {"on": True, "off": False, "auto": self.device.type == "cuda"}[
            recipe.parallel.distributed_optimizer]
        if distributed_optimizer and self.device.type != "cuda":
            raise RecipeError(["parallel.distributed_optimizer = \"on\" needs GPUs; use \"auto\" or \"off\" on CPU"])
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            # Overlap only where there is a reduction to overlap: without it megatron keeps one bucket, whose sync
            # after the backward finds every layer's gradients added (see BatchedAccumulationDDP).
            overlap_grad_reduce=self.device.type == "cuda" and self.env.dp_size * self.env.cp_size > 1,
            use_distributed_optimizer=distributed_optimizer,
        )
        self.ddp = BatchedAccumulationDDP(self.model.config, ddp_config, self.model)
        self.optimizer, self.scheduler = build_optimizer(
            recipe.optim, recipe.train.train_iters, [self.ddp], self.bf16, distributed_optimizer)
        self.ema = EMA(self.model, ema_decay(recipe.train.ema_decay, recipe.train.ema_halflife))
        self._model_fn = as_model_fn(self.ddp, self.device, self.model_dtype)

        self.step = 0
        self.consumed_sequences = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.data = data if data is not None else self._build_data()
        self._stop_signal: int | None = None
        self.stop_requested = False  # a stop signal reached some rank by the last step (all ranks know it)
        self.checkpoint_dir = Path(recipe.checkpoint.dir)
        self._maybe_resume()
        self.logger = MetricsLogger(recipe.logging, str(self.checkpoint_dir), self._run_config(),
                                    enabled=self.env.rank == 0, total_steps=recipe.train.train_iters,
                                    start_step=self.step)
        self.validator = None
        if recipe.validation.interval > 0:
            from dfmkit.train.validation import Validator, ema_evaluation

            self.validator = Validator(
                job, model_fn=self._model_fn, ema_weights=lambda: ema_evaluation(self.model, self.ema),
                shard_draw=self.shard_draw, env=self.env, device=self.device, model_dtype=self.model_dtype,
                pad_multiple=self.pad_multiple, out_dir=self.checkpoint_dir / "validation_generation",
                logger=self.logger)

    # -- set-up helpers --------------------------------------------------------------------

    def _check_data_path(self) -> None:
        data = self.recipe.data
        if data.mock:
            return
        if not data.path:
            raise RecipeError(["data.path is empty: point it at a folder written by `dfmkit prepare`, "
                               "or train on mock data with --mock (data.mock=true)"])
        if not Path(data.path).exists():
            if not data.prepare_source:
                raise RecipeError([f"data.path: dataset folder '{data.path}' does not exist; create it with "
                                   f"`dfmkit prepare RECIPE --source ... --out {data.path}`, or name a source "
                                   "in data.prepare_source"])
            from dfmkit.data.prepare import prepare

            log.info("data.path '%s' does not exist: preparing it from data.prepare_source '%s' first",
                     data.path, data.prepare_source)
            prepare(self.recipe, data.prepare_source, data.path, plugins=self.job.plugins)

    def _build_data(self):
        from dfmkit.data.loader import build_train_loader

        return build_train_loader(self.job, dp_rank=self.env.dp_rank, dp_size=self.env.dp_size,
                                  pad_multiple=self.pad_multiple)

    def _skips(self) -> dict[str, int]:
        skips = getattr(self.data, "skips", None)
        return skips.as_dict() if skips is not None else {}

    def _run_config(self) -> dict[str, Any]:
        import tomllib

        return tomllib.loads(dump_recipe(self.recipe, registries=self.job.plugins.registries))

    # -- state -----------------------------------------------------------------------------

    def _optimizer_sharded_state_dict(self, model_sd: dict[str, Any], is_loading: bool) -> dict[str, Any]:
        # megatron 0.16's default layout for the distributed optimizer (fully_sharded_model_space) saves
        # flattened ranges, which its own torch_dist writer refuses ("ShardedTensor.flattened_range is not
        # supported"): every GPU save failed. fully_reshardable stores each parameter's state whole, as the
        # plain optimizer does, so a checkpoint also loads under another parallel layout.
        if is_loading:
            fill_empty_adam_state(self.optimizer)
        return self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                 metadata={"distrib_optim_sharding_type": "fully_reshardable"})

    def _sharded_state_dict(self) -> dict[str, Any]:
        model_sd = self.model.sharded_state_dict(prefix="model.")
        return {
            "model": model_sd,
            "optimizer": self._optimizer_sharded_state_dict(model_sd, is_loading=False),
            "ema": self.ema.sharded_state_dict(model_sd),
            "scheduler": self.scheduler.state_dict(),
            "trainer": {"step": self.step, "consumed_sequences": self.consumed_sequences,
                        "nonfinite_total": self.nonfinite_total, "ema_updates": self.ema.num_updates},
        }

    def save(self) -> Path:
        marker = {
            "recipe": dump_recipe(self.recipe, registries=self.job.plugins.registries),
            "model": self.recipe.model.name,
            "parallel": {"tensor": self.env.tp_size, "context": self.env.cp_size, "data": self.env.dp_size},
            "skipped_samples": self._skips(),
        }
        rank_state = {"rng": ckpt.rng_state(),
                      "loader": self.data.save_state() if hasattr(self.data, "save_state") else None}
        path = ckpt.save_checkpoint(self.checkpoint_dir, self.step, self._sharded_state_dict(), marker, rank_state,
                                    self.recipe.checkpoint.keep_last)
        return path

    def _maybe_resume(self) -> None:
        cfg = self.recipe.checkpoint
        source = cfg.load or (str(self.checkpoint_dir) if cfg.resume else "")
        if not source:
            return
        found = ckpt.find_checkpoint(source)
        if found is None:
            if cfg.load:
                raise ckpt.CheckpointError(f"checkpoint.load: no complete checkpoint in '{cfg.load}' "
                                           f"(a complete one holds {ckpt.MARKER})")
            return
        marker = ckpt.read_marker(found)
        self._check_same_model(found, marker)
        model_sd = self.model.sharded_state_dict(prefix="model.")
        wanted = {
            "model": model_sd,
            "optimizer": self._optimizer_sharded_state_dict(model_sd, is_loading=True),
            "ema": self.ema.sharded_state_dict(model_sd),
            "scheduler": self.scheduler.state_dict(),
            "trainer": {},
        }
        try:
            state, rank_state = ckpt.load_checkpoint(found, wanted)
        except ckpt.CheckpointError:
            raise
        except (Exception, CheckpointException) as exc:  # shape/key mismatches surface as various exceptions
            raise ckpt.CheckpointError(f"{found} does not fit the model of this recipe: {type(exc).__name__}: "
                                       f"{str(exc)[:500]}") from None
        self.model.load_state_dict(_strip_prefix(state["model"], "model."), strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        ema_state = _strip_prefix(state["ema"], "model.")
        named = dict(self.model.named_parameters())
        for param, shadow in zip(self.ema.params, self.ema.shadow):
            name = next(n for n, p in named.items() if p is param)
            if name in ema_state:
                shadow.copy_(ema_state[name])
        self.scheduler.load_state_dict(state["scheduler"])
        trainer = state["trainer"]
        self.step = int(trainer["step"])
        self.consumed_sequences = int(trainer["consumed_sequences"])
        self.nonfinite_total = int(trainer["nonfinite_total"])
        self.ema.num_updates = int(trainer["ema_updates"])
        ckpt.set_rng_state(rank_state["rng"])
        if rank_state.get("loader") is not None and hasattr(self.data, "restore_state"):
            self.data.restore_state(rank_state["loader"])
        if self.env.rank == 0:
            log.info("resumed from %s at step %d", found, self.step)

    def _check_same_model(self, found: Path, marker: dict[str, Any]) -> None:
        """Refuse, before loading anything, a checkpoint whose [model] section differs from the recipe's in more
        than the options the backbone marks as changing only how it is computed."""
        import tomllib

        saved = tomllib.loads(marker.get("recipe", "")).get("model", {})
        current = tomllib.loads(dump_recipe(self.recipe, registries=self.job.plugins.registries))["model"]
        free = computation_only_options(self.recipe.model.options)
        differences = [f"model.{key}: checkpoint {saved.get(key)!r}, recipe {current.get(key)!r}"
                       for key in sorted(set(saved) | set(current)) if key not in free and saved.get(key) != current.get(key)]
        if differences:
            raise ckpt.CheckpointError(
                f"{found} does not fit the model of this recipe ({'; '.join(differences)}); point checkpoint.dir "
                "elsewhere, or set checkpoint.resume=false to start fresh")

    # -- one step --------------------------------------------------------------------------

    def shard_draw(self, batch: PackedBatch, draw: NoiseDraw) -> tuple[PackedBatch, NoiseDraw]:
        """This rank's context-parallel shard of ``batch`` and of its noise draw, on the training device."""
        from dfmkit import parallel

        local_batch, local_noise = parallel.shard_for_context_parallel(batch, draw.noise, self.env)
        local_draw = attrs.evolve(draw, noise=local_noise.to(self.device), sigma=draw.sigma.to(self.device),
                                  keep_text=draw.keep_text.to(self.device))
        return local_batch.to(self.device), local_draw

    def _loss_terms(self, batch: PackedBatch, generator: torch.Generator) -> LossTerms:
        batch = batch.to(self.device)  # the draw then happens on the device, with the device's generator
        local_batch, local_draw = self.shard_draw(batch, self.edm.draw(batch, generator))
        return self.edm.loss_terms(self._model_fn, local_batch, local_draw, self.model_dtype)

    def train_step(self) -> dict[str, float]:
        from megatron.core.distributed import finalize_model_grads

        from dfmkit import parallel

        batches = [next(self.data) for _ in range(self.micro_batches)]
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_sum = torch.zeros((), device=self.device)
        denominator = torch.zeros((), device=self.device)
        for micro, batch in enumerate(batches):
            generator = step_generator(self.recipe.train.seed, self.step, micro, self.env.dp_rank, self.device)
            share = loss_share(self._loss_terms(batch, generator), self.edm.loss_normalization, self.env)
            share.total.backward()
            loss_sum += share.total.detach()
            denominator += share.count
        # Gradients are sums over this rank's loss terms: reduce them; the optimizer divides them by the
        # global count as it reads them. (Passing num_tokens to finalize_model_grads would divide them
        # first, reading the count to the host, in a pass of its own.)
        global_loss, global_count = loss_sum.clone(), denominator.clone()
        dist.all_reduce(global_loss, group=parallel.data_and_context_group(self.env))
        dist.all_reduce(global_count, group=parallel.data_and_context_group(self.env))
        global_count = global_count.clamp(min=1)
        finalize_model_grads([self.ddp], num_tokens=None)
        if self.optimizer.prepare_grads():
            raise RuntimeError("megatron's optimizer found non-finite gradients through a loss scaler; dfmkit trains "
                               "in bf16 or fp32, without one")
        grad_norm = main_grad_norm(self.optimizer) / global_count
        # Every rank must agree to skip a step (non-finite loss or gradients) and to stop, so both flags are
        # reduced over all ranks; the stop request rides along to save a collective.
        signalled = 1.0 if self._stop_signal is not None else 0.0
        flags = torch.stack([(~torch.isfinite(loss_sum)).float(), (~torch.isfinite(grad_norm)).float(),
                             torch.full((), signalled, device=self.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skip = flags[:2].amax()
        figures = DeviceFigures(torch.stack([global_loss / global_count, grad_norm, skip, flags[2]]))
        # Launched before the host reads the figures: the GPU works through the optimizer and the EMA while
        # the host prepares the next step. The skip decision is made on the device.
        step_on_device(self.optimizer, self.recipe.optim.clip_grad, grad_norm, skip, grad_divisor=global_count)
        self.ema.update(skip)

        loss, grad_norm_value, skipped, stop = figures.read()
        self.step += 1
        self.consumed_sequences += self.recipe.train.global_batch_size
        self.stop_requested = stop > 0
        if skipped:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            return {"loss": float("nan"), "skipped_nonfinite": 1.0}
        self.nonfinite_in_a_row = 0
        self.ema.num_updates += 1
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(1)
        return {
            "loss": loss,
            "grad_norm": grad_norm_value,
            "lr": lr,
            "samples": float(sum(b.num_samples for b in batches)),
            "tokens": float(sum(int(b.seqlens.sum()) for b in batches)),
        }

    # -- the loop --------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Make SIGTERM/SIGINT finish the step, save and stop; returns the handlers to put back."""

        def request_stop(signum, _frame):
            self._stop_signal = signum

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, request_stop)
        return previous

    def train(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to ``train.train_iters``, or stop (and save) after ``until_step`` like a preempted run."""
        from dfmkit import parallel

        recipe = self.recipe
        cfg = recipe.train
        previous_handlers = self._install_signal_handlers()
        history: list[float] = []
        grad_norms: list[float] = []
        window_start, window_samples, window_tokens = time.perf_counter(), 0.0, 0.0
        save_interval = recipe.checkpoint.save_interval
        stopped_by = None
        try:
            last = cfg.train_iters if until_step is None else min(until_step, cfg.train_iters)
            while self.step < last:
                metrics = self.train_step()
                history.append(metrics["loss"])
                grad_norms.append(metrics.get("grad_norm", float("nan")))
                window_samples += metrics.get("samples", 0.0) * self.env.dp_size
                window_tokens += metrics.get("tokens", 0.0) * self.env.dp_size
                if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                    self.save()
                    raise TrainingStopped(
                        f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient norm (step "
                        f"{self.step}); the state was saved to {self.checkpoint_dir}. Lower optim.lr, check the data, or raise "
                        "train.max_nonfinite_steps")
                self.logger.advance(self.step, f"loss {metrics['loss']:.4f}")
                if self.step % cfg.log_interval == 0 or self.step == cfg.train_iters:
                    elapsed = time.perf_counter() - window_start
                    values = {
                        "train/loss": metrics["loss"],
                        "train/lr": metrics.get("lr", float("nan")),
                        "train/grad_norm": metrics.get("grad_norm", float("nan")),
                        "train/samples_per_s": window_samples / elapsed,
                        "train/tokens_per_s": window_tokens / elapsed,
                        "train/nonfinite_steps": float(self.nonfinite_total),
                    }
                    values.update({f"data/skipped_{k}": float(v) for k, v in self._skips().items()})
                    self.logger.scalars(self.step, values)
                    self.logger.step_line(self.step, values)
                    window_start, window_samples, window_tokens = time.perf_counter(), 0.0, 0.0
                if self.validator is not None and self.step % recipe.validation.interval == 0:
                    self.validator.run(self.step)
                if save_interval and self.step % save_interval == 0:
                    self.save()
                if self.stop_requested:
                    stopped_by = self._stop_signal or "a stop signal on another rank"
                    break
            if not save_interval or self.step % save_interval != 0:
                self.save()
        finally:
            self.logger.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        if stopped_by is not None and self.env.rank == 0:
            log.info("stopped by signal %s at step %d; saved to %s", stopped_by, self.step, self.checkpoint_dir)
        parallel.barrier()
        return {"step": self.step, "losses": history, "grad_norms": grad_norms, "checkpoint_dir": str(self.checkpoint_dir),
                "stopped_by_signal": stopped_by is not None}


def computation_only_options(options: Any) -> frozenset[str]:
    """The fields of a component's attrs options marked as changing only how it computes (COMPUTATION_ONLY)."""
    return frozenset(field.name for field in attrs.fields(type(options)) if field.metadata.get(COMPUTATION_ONLY))


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def train(job: Job, *, mock: bool = False, until_step: int | None = None, data: Any = None) -> dict[str, Any]:
    """Train the job's recipe; returns the final step, the per-step losses and the checkpoint folder."""
    return Trainer(job, mock=mock, data=data).train(until_step)
