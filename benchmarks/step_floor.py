"""The floor of a DiT training step on this GPU (:mod:`dfmkit.bench.floor`): its matrix products timed one by one in
cuBLAS, its attention calls in the fastest kernel at hand, all other work at the copy bandwidth measured here; and
the MFU that floor allows. ``--step`` also times the real compiled step of each case, for the ratio.

    python benchmarks/step_floor.py --out results/ [--preset XL] [--cases a,b] [--step]

Prints each case's parts in milliseconds and writes <out>/step_floor.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

from attention_kernels import time_shape
from dfmkit.bench.flops import DEFAULT_PEAK_FLOPS, DiTShape, mfu, training_flops
from dfmkit.bench.floor import bandwidth_bytes, linears, optimizer_bytes
from dfmkit.bench.matrix import THROUGHPUT_CASES, Layout, make_trainer, time_steps
from dfmkit.bench.timing import copy_bandwidth, kernel_milliseconds


def product_milliseconds(kind: str, m: int, k: int, n: int) -> float:
    """Device time of one product as the step runs it: ``x @ w.T`` forward, ``g @ w`` for the input gradient, and
    ``g.T @ x`` added into an fp32 gradient for the weight gradient (bf16 out, where torch has no fp32-out product)."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    if kind == "weight gradient":  # [m, k] @ [k, n] = g.T @ x with g [k, m], x [k, n]
        g, x = torch.randn(k, m, **bf16), torch.randn(k, n, **bf16)
        grad = torch.zeros(m, n, device="cuda", dtype=torch.float32)
        try:
            torch.addmm(grad, g.t(), x, out_dtype=torch.float32, out=grad)
            return kernel_milliseconds(lambda: torch.addmm(grad, g.t(), x, out_dtype=torch.float32, out=grad))
        except (RuntimeError, TypeError):
            return kernel_milliseconds(lambda: g.t() @ x)
    a = torch.randn(m, k, **bf16)
    w = torch.randn(n, k, **bf16) if kind == "forward" else torch.randn(k, n, **bf16)
    return kernel_milliseconds(lambda: a @ w.t()) if kind == "forward" else kernel_milliseconds(lambda: a @ w)


def attention_milliseconds(samples: int, heads: int, queries: int, keys: int, head_dim: int) -> tuple[float, str]:
    """Forward + backward of the fastest kernel that takes the shape, and its name."""
    rows, _ = time_shape(f"{samples}x{queries}->{keys}", samples, heads, queries, keys, head_dim)
    best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    return best["ms"], best["kernel"]


def parameter_count(preset: str) -> int:
    from dfmkit.components.backbones import dit
    from dfmkit.components.backbones.options import DiTOptions

    return sum(p.numel() for p in dit.build(DiTOptions(preset=preset), device="meta").parameters())


def floor(preset: str, case: dict, bandwidth: float) -> dict:
    from dfmkit.components.backbones.options import DiTOptions

    options = DiTOptions(preset=preset)
    shape = DiTShape.from_options(options)
    samples = case["samples_per_pack"]
    _, frames, height, width = case["latent_shape"]
    tokens_each = (frames // options.patch_temporal) * (height // options.patch_spatial) * (width // options.patch_spatial)
    lengths, texts = [tokens_each] * samples, [case["text_tokens"]] * samples
    cache: dict = {}
    products = {}
    for linear in linears(shape, lengths, texts):
        for kind, m, k, n in linear.products():
            if (kind, m, k, n) not in cache:
                cache[kind, m, k, n] = product_milliseconds(kind, m, k, n)
            products[f"{linear.name}, {kind}"] = linear.count * cache[kind, m, k, n]
    head_dim = shape.hidden_size // shape.num_heads
    self_ms, self_kernel = attention_milliseconds(samples, shape.num_heads, tokens_each, tokens_each, head_dim)
    cross_ms, cross_kernel = attention_milliseconds(samples, shape.num_heads, tokens_each, case["text_tokens"], head_dim)
    moved = bandwidth_bytes(shape, sum(lengths), sum(texts))
    parts = {
        "matrix products": sum(products.values()),
        f"self-attention ({self_kernel})": shape.num_layers * self_ms,
        f"cross-attention ({cross_kernel})": shape.num_layers * cross_ms,
        **{name: 1e3 * size / bandwidth for name, size in moved.items()},
        "optimizer, gradient norm, EMA": 1e3 * optimizer_bytes(parameter_count(preset)) / bandwidth,
    }
    total = sum(parts.values())
    flops = training_flops(shape, lengths, texts)
    return {"parts_ms": parts, "products_ms": products, "floor_ms": total, "mfu_at_floor": mfu(flops / (total / 1e3)),
            "training_flops": flops}


def measured_step(preset: str, case: dict, graphs: bool) -> dict:
    torch.cuda.empty_cache()  # the floor's operands are not to crowd the step's memory
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(preset, Layout(), text_dim=1024, attention="torch", workdir=workdir, steps=1000,
                               model={"compile": True, "cuda_graphs": graphs}, **case)
        _, seconds = time_steps(trainer, 5, 8)
    del trainer
    gc.collect()  # the trainer's reference cycles hold its memory until collected
    torch.cuda.empty_cache()
    return {"step_ms": 1e3 * seconds, "cuda_graphs": graphs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="floor_results")
    parser.add_argument("--preset", default="XL")
    parser.add_argument("--cases", default="a,b")
    parser.add_argument("--step", action="store_true", help="also time the real compiled step (case b with CUDA graphs)")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": bandwidth / 1e9,
               "peak_TFLOPs": DEFAULT_PEAK_FLOPS / 1e12, "cases": {}}
    for name in args.cases.split(","):
        row = floor(args.preset, THROUGHPUT_CASES[name], bandwidth)
        if args.step:
            row["measured"] = measured_step(args.preset, THROUGHPUT_CASES[name], graphs=name == "b")
            row["measured"]["mfu"] = mfu(row["training_flops"] / (row["measured"]["step_ms"] / 1e3))
        results["cases"][name] = row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_floor.json").write_text(json.dumps(results, indent=2))
    print(f"{results['device']}, torch {results['torch']}, copy {bandwidth / 1e9:.0f} GB/s")
    for name, row in results["cases"].items():
        print(f"case {name}: floor {row['floor_ms']:.1f} ms = {row['mfu_at_floor']:.1%} MFU at most")
        for part, ms in row["parts_ms"].items():
            print(f"  {ms:8.2f} ms  {part}")
        if "measured" in row:
            step = row["measured"]
            print(f"  measured step {step['step_ms']:.1f} ms ({step['mfu']:.1%}): the floor is "
                  f"{row['floor_ms'] / step['step_ms']:.0%} of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
