"""``dfmkit bench``: training throughput and MFU of DiT presets over parallel layouts, on mock packs.

Each (model, layout) runs the real training step (megatron DDP, optimizer, the objective's loss on packed
sequences) on mock packs: warm-up steps, then timed steps. Every rank trains on the same packs and
the same initial weights (built on the CPU, identical for every tensor-parallel size), so the loss of
the first step must agree across layouts: the table's parity column is its relative difference to
the single-device layout (TP = CP = 1). A layout that does not fit the visible processes is listed
with the reason, not run.

Run it on one process or under torchrun; the layout's data-parallel size is whatever the world
size leaves after tensor x context.

What is not known is shown as n/a, with the reason under the table: MFU needs the device's peak FLOP/s
(989 TFLOP/s, dense bf16 of an H100/H200, on CUDA unless ``peak_tflops`` says otherwise; none on the CPU),
and peak memory is measured by CUDA's allocator only.
"""

from __future__ import annotations

import gc
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist

from dfmkit.bench.flops import DiTShape, mfu, training_flops
from dfmkit.errors import DfmkitError

H100_BF16_DENSE_TFLOPS = 989.0
# The DiT-XL training cases of the throughput figures (issue 9): (a) 128 images of 256 latent tokens with 77 text
# tokens each, (b) butterfly-shaped packs of 15 images of 1024 tokens with 10 text tokens each.
THROUGHPUT_CASES = {
    "a": dict(seq_length=32768, latent_shape=(16, 1, 32, 32), text_tokens=77, samples_per_pack=128),
    "b": dict(seq_length=15360, latent_shape=(16, 1, 64, 64), text_tokens=10, samples_per_pack=15),
}
_LAYOUT = re.compile(r"^(?:tp(?P<tp>\d+))?(?P<sp>\+sp)?(?:cp(?P<cp>\d+))?$")


@attrs.frozen
class Layout:
    tensor: int = 1
    context: int = 1
    sequence: bool = False

    @property
    def name(self) -> str:
        return f"tp{self.tensor}{'+sp' if self.sequence else ''}cp{self.context}"

    def unfit_reason(self, world: int, heads: int) -> str | None:
        if world % (self.tensor * self.context):
            return f"needs a multiple of {self.tensor * self.context} processes, {world} visible"
        if heads % self.tensor:
            return f"{heads} heads do not split over tensor {self.tensor}"
        if self.sequence and self.tensor == 1:
            return "sequence parallelism needs tensor > 1"
        return None


def parse_layouts(text: str) -> list[Layout]:
    """``"tp1cp1,tp2,tp2+sp,cp2,tp2cp2"`` -> layouts; tp/cp default to 1."""
    layouts = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        match = _LAYOUT.match(item)
        if not match or item in ("", "+sp"):
            raise DfmkitError(f"bench: layout '{item}' is not of the form tp<N>[+sp][cp<M>] (for example tp2+sp, cp2, tp2cp2)")
        layouts.append(Layout(int(match["tp"] or 1), int(match["cp"] or 1), bool(match["sp"])))
    return layouts


class CyclingBatches:
    """A few mock packs made once and served in turn, so data making stays out of the timing."""

    def __init__(self, recipe: Any, pad_multiple: int, count: int = 2, seed: int = 1234):
        from dfmkit.data.mock import MockLoader

        loader = MockLoader(recipe, dp_rank=0, dp_size=1, pad_multiple=pad_multiple, seed=seed)
        self.batches = [next(loader) for _ in range(count)]
        if torch.cuda.is_available():  # as the training loader delivers them: page-locked
            self.batches = [batch.pin_memory() for batch in self.batches]
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch


def _recipe(preset: str, layout: Layout, seq_length: int, latent_shape: Sequence[int], text_tokens: int,
            text_dim: int, samples_per_pack: int, attention: str, workdir: str, steps: int,
            model: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {
        "model": {"name": "dit", "preset": preset, "in_channels": int(latent_shape[0]), "text_dim": text_dim,
                  "attention": attention, "use_cpu_initialization": True, **(model or {})},
        "sampler": {"name": "euler"},
        "tokenizer": {"name": "identity"},
        "text_encoder": {"name": "t5-tiny"},
        "task_encoder": {"name": "packed"},
        "data": {"mock": True, "seq_length": seq_length, "mock_latent_shape": list(latent_shape),
                 "mock_text_tokens": text_tokens, "mock_text_dim": text_dim, "mock_samples_per_pack": samples_per_pack},
        "parallel": {"tensor": layout.tensor, "context": layout.context, "sequence": layout.sequence},
        "train": {"train_iters": steps + 10, "global_batch_size": 0, "log_interval": 10_000},
        "optim": {"warmup_iters": 1},
        "checkpoint": {"dir": workdir, "save_interval": 0, "resume": False},
        "logging": {"dir": workdir, "progress": False},
        "validation": {"interval": 0},
    }


def make_trainer(preset: str, layout: Layout, *, seq_length: int, latent_shape: Sequence[int], text_tokens: int,
                 text_dim: int, samples_per_pack: int, attention: str, workdir: str, steps: int,
                 model: Mapping[str, Any] | None = None):
    """A Trainer of ``preset`` in ``layout`` on cycling mock packs (every rank the same packs); ``model``
    overrides further options of the recipe's [model] section (recompute, compile, fused_kernels, ...)."""
    import dfmkit
    from dfmkit import parallel
    from dfmkit.train.loop import Trainer

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    data = _recipe(preset, layout, seq_length, latent_shape, text_tokens, text_dim, samples_per_pack, attention,
                   workdir, steps, model)
    data["train"]["global_batch_size"] = world // (layout.tensor * layout.context)
    job = dfmkit.build(data)
    return Trainer(job, data=CyclingBatches(job.recipe, parallel.required_pad_multiple(job.recipe.parallel)))


def time_steps(trainer, warmup: int, steps: int) -> tuple[list[float], float]:
    """Losses of the warm-up steps, and the seconds per timed step."""
    cuda = trainer.device.type == "cuda"
    losses = [trainer.train_step()["loss"] for _ in range(warmup)]
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    return losses, (time.perf_counter() - start) / steps


def run_case(preset: str, layout: Layout, *, seq_length: int, latent_shape: Sequence[int], text_tokens: int,
             text_dim: int, samples_per_pack: int, attention: str, warmup: int, steps: int,
             peak_tflops: float | None = None, model: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One (model, layout) row of the table. Call on every rank. ``peak_tflops``: one device's peak for the
    MFU (None: H100/H200's on CUDA, no MFU on the CPU); figures that are not known are None.

    The loss compared across layouts is that of the SECOND step: at initialisation the adaLN-Zero
    model outputs zero, so the first loss does not depend on the weights at all.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(preset, layout, seq_length=seq_length, latent_shape=latent_shape,
                               text_tokens=text_tokens, text_dim=text_dim, samples_per_pack=samples_per_pack,
                               attention=attention, workdir=workdir, steps=warmup + steps, model=model)
        cuda = trainer.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if peak_tflops is None and cuda:
            peak_tflops = H100_BF16_DENSE_TFLOPS
        losses, seconds = time_steps(trainer, max(2, warmup), steps)
        dp = trainer.env.dp_size
        batch = trainer.data.batches[0]
        options = trainer.recipe.model.options
        shape = DiTShape.from_options(options)
        step_flops = training_flops(shape, batch.seqlens.tolist(), batch.seqlens_kv.tolist()) * dp
        tokens = int(batch.seqlens.sum()) * dp
        params = sum(p.numel() for p in trainer.state.model.parameters()) * layout.tensor  # TP shards summed back
        row = {
            "model": preset, "params_M": round(params / 1e6, 1), "layout": layout.name, "dp": dp,
            "attention": attention, "recompute": options.recompute, "compile": options.compile,
            "fused_kernels": options.fused_kernels, "cuda_graphs": options.cuda_graphs,
            "seq_length": int(batch.num_tokens), "samples_per_pack": batch.num_samples,
            "tokens_per_s_per_gpu": tokens / seconds / world,
            "tflops_per_gpu": step_flops / seconds / world / 1e12,
            "mfu": mfu(step_flops / seconds / world, peak=peak_tflops * 1e12) if peak_tflops else None,
            "step_ms": 1000 * seconds,
            "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "loss_step2": losses[1],
            "device": torch.cuda.get_device_name() if cuda else "cpu",
        }
        # The trainer's model, optimizer and EMA hold each other in reference cycles (megatron's DDP hooks), so
        # only the cycle collector frees them; and the compiled layers and the memory pools of their CUDA
        # graphs live on in dynamo's caches. A later case in this process would otherwise start with that
        # memory taken (DiT-XL's weights, master weights, moments, gradients and EMA: about 15 GiB).
        del trainer
        if cuda:
            torch.compiler.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return row


def run_matrix(models: Sequence[str], layouts: Sequence[Layout], **case: Any) -> list[dict[str, Any]]:
    from dfmkit.components.backbones.options import PRESETS

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    rows = []
    for preset in models:
        if preset not in PRESETS:
            raise DfmkitError(f"bench: unknown model '{preset}'; presets are {', '.join(PRESETS)}")
        heads = PRESETS[preset][2]
        baseline = None
        for layout in layouts:
            reason = layout.unfit_reason(world, heads)
            if reason:
                rows.append({"model": preset, "layout": layout.name, "skipped": reason})
                continue
            try:
                row = run_case(preset, layout, **case)
            except torch.OutOfMemoryError:  # every rank holds the same share, so every rank lands here
                torch.cuda.empty_cache()
                rows.append({"model": preset, "layout": layout.name, "skipped": "out of GPU memory"})
                continue
            if layout.tensor == 1 and layout.context == 1:
                baseline = row["loss_step2"]
            row["loss_parity"] = abs(row["loss_step2"] - baseline) / abs(baseline) if baseline else None
            rows.append(row)
    return rows


COLUMNS = [("model", "model"), ("params_M", "params (M)"), ("layout", "layout"), ("dp", "DP"),
           ("seq_length", "seq len"), ("tokens_per_s_per_gpu", "tokens/s/GPU"), ("tflops_per_gpu", "TFLOP/s/GPU"),
           ("mfu", "MFU"), ("peak_memory_GiB", "peak mem (GiB)"), ("compile", "compile"), ("fused_kernels", "kernels"),
           ("cuda_graphs", "graphs"), ("recompute", "recompute"), ("loss_parity", "loss parity")]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The table, and under it why a figure is n/a."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes: dict[str, None] = {}
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['model']} | | {row['layout']} | skipped: {row['skipped']} |" + " |" * (len(COLUMNS) - 4))
            continue
        if row.get("mfu") is None:
            notes[f"MFU n/a: no peak FLOP/s known for {row.get('device', 'this device')} (give --peak-tflops)"] = None
        if row.get("peak_memory_GiB") is None:
            notes["peak memory n/a: measured on CUDA only"] = None
        if row.get("loss_parity") is None:
            notes["loss parity n/a: the single-device layout (tp1cp1) did not run before it"] = None
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key)
            if value is None:
                cells.append("n/a")
            elif key == "mfu":
                cells.append(f"{100 * value:.1f}%")
            elif key == "loss_parity":
                cells.append(f"{value:.1e}")
            elif isinstance(value, float):
                cells.append(f"{value:,.1f}" if value >= 10 else f"{value:.2f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(rows, indent=2))
    (out / "bench.md").write_text(to_markdown(rows))
