"""The checkpointable state of a run: the model, megatron's DDP around it, the optimizer and its schedule, the EMA
and the counters; :func:`build_train_state` makes it from a recipe, and it saves and loads itself as one sharded
state dict (megatron dist_checkpointing, through :mod:`dfmkit.train.checkpoint`).

What is not in here: the data loader's position and the RNG states (per rank, beside it in the checkpoint; see
:meth:`dfmkit.train.loop.Trainer.save` and :func:`dfmkit.train.resume.resume`), and what the loop keeps only while
it runs (the non-finite steps in a row, a stop request).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch
from torch.distributed.checkpoint.api import CheckpointException

from dfmkit import parallel
from dfmkit.compat.megatron_ddp import BatchedAccumulationDDP
from dfmkit.compat.megatron_optimizer import fill_empty_adam_state
from dfmkit.errors import RecipeError
from dfmkit.job import Job
from dfmkit.parallel import ParallelLayout
from dfmkit.recipe import ParallelConfig, Recipe
from dfmkit.train import checkpoint as ckpt
from dfmkit.train.ema import EMA, ema_decay
from dfmkit.train.optim import build_optimizer


@attrs.define(eq=False)
class TrainState:
    """What a checkpoint holds of a run (besides the per-rank data position and RNG states)."""

    model: torch.nn.Module
    ddp: BatchedAccumulationDDP
    optimizer: Any  # megatron's (possibly chained) optimizer
    scheduler: Any  # megatron's OptimizerParamScheduler
    ema: EMA
    step: int = 0  # optimizer steps taken (skipped ones included)
    consumed_sequences: int = 0
    nonfinite_total: int = 0  # steps skipped for a non-finite loss or gradient norm

    def sharded_state_dict(self, *, is_loading: bool = False) -> dict[str, Any]:
        model_sd = self.model.sharded_state_dict(prefix="model.")
        if is_loading:
            fill_empty_adam_state(self.optimizer)
        # megatron 0.16's default layout for the distributed optimizer (fully_sharded_model_space) saves
        # flattened ranges, which its own torch_dist writer refuses ("ShardedTensor.flattened_range is not
        # supported"): every GPU save failed. fully_reshardable stores each parameter's state whole, as the
        # plain optimizer does, so a checkpoint also loads under another parallel layout.
        optimizer_sd = self.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        return {
            "model": model_sd,
            "optimizer": optimizer_sd,
            "ema": self.ema.sharded_state_dict(model_sd),
            "scheduler": self.scheduler.state_dict(),
            "trainer": {} if is_loading else {
                "step": self.step, "consumed_sequences": self.consumed_sequences,
                "nonfinite_total": self.nonfinite_total, "ema_updates": self.ema.num_updates},
        }

    def save(self, directory: Path, marker: dict[str, Any], rank_state: dict[str, Any], keep_last: int) -> Path:
        """A checkpoint of this state at its step under ``directory`` (on every rank); returns its folder."""
        return ckpt.save_checkpoint(directory, self.step, self.sharded_state_dict(), marker, rank_state, keep_last)

    def load(self, checkpoint: Path) -> dict[str, Any]:
        """Load ``checkpoint`` into this state; returns this rank's JSON state (RNGs, data position). The optimizer's
        settings and its schedule stay those this state was built with (the recipe's); the schedule goes on from the
        checkpoint's step."""
        try:
            state, rank_state = ckpt.load_checkpoint(checkpoint, self.sharded_state_dict(is_loading=True))
        except ckpt.CheckpointError:
            raise
        except (Exception, CheckpointException) as exc:  # shape/key mismatches surface as various exceptions
            raise ckpt.CheckpointError(f"{checkpoint} does not fit the model of this recipe: {type(exc).__name__}: "
                                       f"{str(exc)[:500]}") from None
        self.model.load_state_dict(_strip_prefix(state["model"], "model."), strict=False)
        # The optimizer's settings (betas, eps, the lr bounds, ...) are the recipe's; its state comes from the
        # checkpoint, whose param groups would bring back the settings it was saved with.
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, mine in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(mine)
        ema_state = _strip_prefix(state["ema"], "model.")
        name_of = {param: name for name, param in self.model.named_parameters()}
        for param, shadow in zip(self.ema.params, self.ema.shadow):
            if name_of[param] in ema_state:
                shadow.copy_(ema_state[name_of[param]])
        self.scheduler.load_state_dict(state["scheduler"])  # the recipe's schedule at the checkpoint's step
        counters = state["trainer"]
        self.step = int(counters["step"])
        self.consumed_sequences = int(counters["consumed_sequences"])
        self.nonfinite_total = int(counters["nonfinite_total"])
        self.ema.num_updates = int(counters["ema_updates"])
        return rank_state


def uses_distributed_optimizer(config: ParallelConfig, device: torch.device) -> bool:
    """megatron's distributed optimizer: ``parallel.distributed_optimizer`` "on", "off", or "auto" (on GPUs)."""
    if config.distributed_optimizer == "on" and device.type != "cuda":
        raise RecipeError(["parallel.distributed_optimizer = \"on\" needs GPUs; use \"auto\" or \"off\" on CPU"])
    return {"on": True, "off": False, "auto": device.type == "cuda"}[config.distributed_optimizer]


def training_ddp_config(config: ParallelConfig, env: ParallelLayout, device: torch.device):
    """megatron's DDP settings for training: fp32 gradient buffers, reduction overlapped with the backward on GPUs
    where there is one to overlap."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        # Overlap only where there is a reduction to overlap: without it megatron keeps one bucket, whose sync
        # after the backward finds every layer's gradients added (see BatchedAccumulationDDP).
        overlap_grad_reduce=device.type == "cuda" and env.dp_size * env.cp_size > 1,
        use_distributed_optimizer=uses_distributed_optimizer(config, device),
    )


def build_train_state(job: Job, recipe: Recipe, env: ParallelLayout, device: torch.device, model_dtype: torch.dtype,
                      *, ddp_config: Any = None) -> TrainState:
    """The state of a fresh run of ``recipe``: the model seeded with ``train.seed`` (in ``model_dtype`` on
    ``device``), megatron's DDP around it (``ddp_config``, default :func:`training_ddp_config`), AdamW and its
    schedule, and the EMA. megatron's groups must be set up for ``recipe.parallel`` (``env``)."""
    torch.manual_seed(recipe.train.seed)
    parallel.seed_model_parallel(recipe.train.seed)
    model = job.components["model"].build(recipe=recipe).to(device)
    if model_dtype == torch.bfloat16:
        model.to(torch.bfloat16)
    if ddp_config is None:
        ddp_config = training_ddp_config(recipe.parallel, env, device)
    ddp = BatchedAccumulationDDP(model.config, ddp_config, model)
    optimizer, scheduler = build_optimizer(recipe.optim, recipe.train.train_iters, [ddp],
                                           model_dtype == torch.bfloat16, ddp_config.use_distributed_optimizer)
    ema = EMA(model, ema_decay(recipe.train.ema_decay, recipe.train.ema_halflife))
    return TrainState(model=model, ddp=ddp, optimizer=optimizer, scheduler=scheduler, ema=ema)


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
