"""Where a DiT training step spends its GPU time, and what torch.compile of the blocks changes.

    python benchmarks/gpu_profile.py --out results/ [--preset XL] [--case a|b]

Writes <out>/profile_<case>.txt (the kernels by GPU time for two steps) and prints step times for
the eager model and for each DiT layer compiled with torch.compile.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from dfmkit.bench.flops import DiTShape, mfu, training_flops
from dfmkit.bench.matrix import Layout, make_trainer, time_steps

CASES = {
    "a": dict(seq_length=32768, latent_shape=(16, 1, 32, 32), text_tokens=77, samples_per_pack=128),
    "b": dict(seq_length=15360, latent_shape=(16, 1, 64, 64), text_tokens=10, samples_per_pack=15),
}


def measure(trainer, label: str, steps: int) -> dict:
    losses, seconds = time_steps(trainer, 3, steps)
    batch = trainer.data.batches[0]
    flops = training_flops(DiTShape.from_options(trainer.recipe.model.options), batch.seqlens.tolist(),
                           batch.seqlens_kv.tolist())
    row = {"variant": label, "step_ms": 1000 * seconds, "mfu": mfu(flops / seconds),
           "loss_step2": losses[1], "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="profile_results")
    parser.add_argument("--preset", default="XL")
    parser.add_argument("--case", default="a", choices=sorted(CASES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", default="eager,profile,compile")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(args.preset, Layout(), text_dim=1024, attention="torch", workdir=workdir,
                               steps=1000, **CASES[args.case])
        if "eager" in variants:
            rows.append(measure(trainer, "eager", args.steps))
        if "profile" in variants:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    trainer.train_step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90)
            (out / f"profile_{args.case}.txt").write_text(table)
            print(table[:6000], flush=True)
        if "compile" in variants:
            for layer in trainer.model.decoder.layers:
                layer.forward = torch.compile(layer.forward)
            try:
                rows.append(measure(trainer, "compile(layers)", args.steps))
            except Exception as exc:  # report and keep the other numbers
                print(f"compile failed: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    (out / f"profile_{args.case}.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
