"""DiT training throughput and sampling latency on one GPU (issue 9): the figures in the README.

Runs, in one process: DiT-XL training steps on (a) 128 packed 256-token images with 77 text tokens each
and (b) butterfly-shaped packs (15 x 1024-token images, 10 text tokens); the S/B/L presets on (a);
35-step Heun sampling with guidance for 1 and 16 images of 1024 tokens. Each training case runs eager and
with ``model.compile`` (``--compile both``, the default); sampling runs each of those with and without one CUDA
graph per denoiser evaluation (``--sampling-graphs``). A case that runs out of memory
is retried with activation recomputation ("selective", then "full"). Results: <out>/gpu_throughput.json
and a markdown table on stdout.

    python benchmarks/gpu_throughput.py --out results/ [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from dfmkit.bench.matrix import THROUGHPUT_CASES, Layout, run_case, to_markdown
from dfmkit.bench.sampling import sampling_latency

CASE_A, CASE_B = THROUGHPUT_CASES["a"], THROUGHPUT_CASES["b"]


def train_case(preset: str, case: dict, attention: str, steps: int, model: dict,
               recompute_order=("none", "selective", "full")):
    for recompute in recompute_order:
        try:
            model = {**model, "recompute": recompute}
            row = run_case(preset, Layout(), text_dim=1024, attention=attention, warmup=3, steps=steps,
                           peak_tflops=989.0, model=model, **case)
            row["case"] = "a: 128 x 256 tokens" if case is CASE_A else "b: 15 x 1024 tokens"
            return row
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"{preset} {case['samples_per_pack']}x: out of memory with recompute={recompute}", flush=True)
    return {"model": preset, "layout": "tp1cp1", "skipped": "out of memory even with full recomputation"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--presets", default="XL,L,B,S")
    parser.add_argument("--attention", default="torch")
    parser.add_argument("--compile", default="both", choices=["off", "on", "both"],
                        help="model.compile (fused elementwise chains): off, on, or both variants of each case")
    parser.add_argument("--fused-kernels", default="on", choices=["off", "on", "both"],
                        help="the DiT's Triton kernels for the adaLN chain and q/k norm + RoPE (model.fused_kernels)")
    parser.add_argument("--cuda-graphs", default="off", choices=["off", "on", "both"],
                        help="replay the compiled layers as CUDA graphs (model.cuda_graphs; compiled variants only)")
    parser.add_argument("--sampling-graphs", default="both", choices=["off", "on", "both"],
                        help="sampling: each guided denoiser evaluation replays one CUDA graph (with each --compile "
                             "variant)")
    parser.add_argument("--skip-sampling", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "train": [], "sampling": []}

    def dump():
        (out / "gpu_throughput.json").write_text(json.dumps(results, indent=2))

    for preset in args.presets.split(","):
        cases = [CASE_A, CASE_B] if preset == "XL" else [CASE_A]
        for case in cases:
            variants = {"off": [False], "on": [True], "both": [False, True]}
            for compile, fused, graphs in itertools.product(variants[args.compile], variants[args.fused_kernels],
                                                            variants[args.cuda_graphs]):
                if graphs and not compile:
                    continue
                model = {"compile": compile, "fused_kernels": fused, "cuda_graphs": graphs}
                start = time.perf_counter()
                row = train_case(preset, case, args.attention, args.steps, model)
                row["wall_s"] = time.perf_counter() - start
                results["train"].append(row)
                print(json.dumps(row), flush=True)
                dump()
    if not args.skip_sampling:
        variants = {"off": [False], "on": [True], "both": [False, True]}
        for compile, graphs in itertools.product(variants[args.compile], variants[args.sampling_graphs]):
            for images in (1, 16):
                row = sampling_latency("XL", images=images, latent_shape=(16, 1, 64, 64), steps=35, guidance=8.0,
                                       attention=args.attention, cuda_graphs=graphs, compile=compile)
                results["sampling"].append(row)
                print(json.dumps(row), flush=True)
                dump()
    print(f"torch {results['torch']} on {results['device']}")
    print(to_markdown([r for r in results["train"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
