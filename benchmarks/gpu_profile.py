"""Where a DiT training step spends its GPU time, and what torch.compile of the blocks changes.

    python benchmarks/gpu_profile.py --out results/ [--preset XL] [--case a|b] [--inductor KEY=VALUE ...]

Prints step time and MFU of each variant (eager; model.compile, torch.compile of each DiT layer; graphs,
compiled layers replayed as CUDA graphs) and
writes <out>/profile_<case>_<variant>.txt, the operators by GPU time and by CPU time over two steps of the
last model built, <out>/families_<case>_<variant>.json, its GPU time per step by kernel family (matrix
products, attention, GELU, ...), <out>/kernels_<case>_<variant>.json, each kernel's launches and time per step,
and <out>/profile_<case>.json.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from dfmkit.bench.flops import DiTShape, mfu, training_flops
from dfmkit.bench.matrix import THROUGHPUT_CASES as CASES, Layout, make_trainer, time_steps
from dfmkit.bench.timing import gpu_kernels


def measure(trainer, label: str, steps: int) -> dict:
    # Five warm-up steps: three were too few for model.cuda_graphs at 128 x 256 (714 ms a step over the 8 timed
    # ones on an H200, where after five warm-up steps three rounds of 6 took 269-271 ms).
    losses, seconds = time_steps(trainer, 5, steps)
    batch = trainer.data.batches[0]
    flops = training_flops(DiTShape.from_options(trainer.recipe.model.options), batch.seqlens.tolist(),
                           batch.seqlens_kv.tolist())
    # Allocator retries (a full cache freed and cudaMalloc tried again) synchronise the host with the GPU: a step
    # near the memory limit can lose more to them than any kernel change wins.
    row = {"variant": label, "step_ms": 1000 * seconds, "mfu": mfu(flops / seconds),
           "loss_step2": losses[1], "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
           "reserved_GiB": torch.cuda.max_memory_reserved() / 2**30,
           "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
           "graphs": counters["stats"].get("unique_graphs", 0), "recompiles": sum(counters["recompiles"].values())}
    print(json.dumps(row), flush=True)
    return row


# Kernel families by name, first match wins: cuBLAS/CUTLASS products, attention (cuDNN, flash), the
# optimizer's multi-tensor kernels, inductor's generated kernels (GELU apart), dfmkit's own Triton kernels
# (dfmkit.kernels.adaln, .qkv: their jit functions are named _forward, _backward, _sum_partials), the rest.
KERNEL_FAMILIES = [
    ("matrix products", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")),
    ("attention", ("cudnn", "flash", "fmha", "attn", "sdpa")),
    ("optimizer", ("multi_tensor", "adam")),
    ("inductor: GELU", ("gelu",)),
    ("inductor: other", ("triton_",)),
    ("dfmkit kernels", ("_forward", "_backward", "_sum_partials")),
]


def kernel_families(events, steps: int) -> dict:
    """Milliseconds per step of the GPU kernels in each of KERNEL_FAMILIES (and "other"), plus their total."""
    totals: dict = {}
    for event in gpu_kernels(events):
        family = family_of(event.name)
        totals[family] = totals.get(family, 0.0) + event.device_time_total / 1e3 / steps
    totals["GPU busy"] = sum(totals.values())
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def family_of(name: str) -> str:
    name = name.lower()
    return next((f for f, keys in KERNEL_FAMILIES if any(k in name for k in keys)), "other")


def kernel_table(events, steps: int) -> list[dict]:
    """Each GPU kernel name with its launches and milliseconds per step, longest first: which kernels to
    fuse or remove (the families say how much, this says which)."""
    rows: dict = {}
    for event in gpu_kernels(events):
        row = rows.setdefault(event.name, {"kernel": event.name, "family": family_of(event.name), "calls": 0,
                                           "ms": 0.0})
        row["calls"] += 1 / steps
        row["ms"] += event.device_time_total / 1e3 / steps
    longest_first = sorted(rows.values(), key=lambda r: -r["ms"])
    return [{**r, "calls": round(r["calls"], 1), "ms": round(r["ms"], 3)} for r in longest_first]


def profile_steps(trainer, out: Path, name: str, trace: bool = False) -> None:
    from torch.profiler import ProfilerActivity, profile

    steps = 2
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step()
        torch.cuda.synchronize()
    if trace:  # the timeline, to find where the GPU waits (chrome://tracing or perfetto.dev)
        path = out / f"trace_{name}.json"
        prof.export_chrome_trace(str(path))
        with open(path, "rb") as raw, gzip.open(f"{path}.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        path.unlink()
    families = kernel_families(prof.events(), steps)
    (out / f"families_{name}.json").write_text(json.dumps(families, indent=2))
    print(json.dumps({"kernel families, ms per step": families}), flush=True)
    kernels = kernel_table(prof.events(), steps)
    (out / f"kernels_{name}.json").write_text(json.dumps(kernels, indent=1))
    print(f"{sum(r['calls'] for r in kernels):.0f} kernels a step; the longest:", flush=True)
    for r in kernels[:40]:
        print(f"  {r['ms']:8.3f} ms {r['calls']:7.1f} x  {r['family']:16s} {r['kernel'][:110]}", flush=True)
    averages = prof.key_averages()
    by_gpu = averages.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90)
    by_cpu = averages.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=90)
    (out / f"profile_{name}.txt").write_text(f"By GPU time\n{by_gpu}\n\nBy CPU time\n{by_cpu}\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="profile_results")
    parser.add_argument("--preset", default="XL")
    parser.add_argument("--case", default="a", choices=sorted(CASES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--attention", default="torch", help="attention backend (model.attention)")
    parser.add_argument("--trace", action="store_true", help="also write the profiled steps' timeline, gzipped")
    parser.add_argument("--variants", default="eager,compile,profile",
                        help="eager: model.compile off; compile: model.compile on; graphs: compile and "
                             "model.cuda_graphs; profile: operator tables of the last model built")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="set torch._inductor.config.KEY (a Python literal) before the models are built, e.g. "
                             "combo_kernels=True; repeatable")
    args = parser.parse_args()
    for setting in args.inductor:
        key, _, value = setting.partition("=")
        torch._inductor.config.__setattr__(key, ast.literal_eval(value))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.inductor:
        print(json.dumps({"inductor": args.inductor}), flush=True)
    variants = args.variants.split(",")
    trainer = None
    with tempfile.TemporaryDirectory() as workdir:
        def build(variant: str):
            model = {"compile": variant != "eager", "cuda_graphs": variant == "graphs"}
            return make_trainer(args.preset, Layout(), text_dim=1024, attention=args.attention, workdir=workdir,
                                steps=1000, model=model, **CASES[args.case])

        for variant in variants:
            try:
                if variant in ("eager", "compile", "graphs"):
                    trainer = None
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    counters.clear()
                    trainer = build(variant)
                    rows.append(measure(trainer, variant, args.steps))
                elif variant == "profile":
                    profile_steps(trainer, out, f"{args.case}_{rows[-1]['variant'] if rows else 'model'}", args.trace)
            except Exception as exc:  # report and keep the other numbers
                print(f"{variant} failed: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    (out / f"profile_{args.case}.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
