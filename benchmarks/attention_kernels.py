"""Packed attention kernels on one GPU: flash varlen, batched SDPA backends and dfmkit's short-key kernels,
forward + backward.

The DiT's packs of equal-size images can run attention as one batch ``[N, H, S, D]`` instead of a
varlen call; this measures which kernel is fastest for the shapes of the throughput cases (DiT-XL: 16
heads of 72 channels; self-attention over 256 or 1024 tokens, cross-attention to 77 or 10 text tokens).

    python benchmarks/attention_kernels.py --out results/ [--sweep] [--shapes "cross 128x256->77,..."]

``--sweep`` also times the short-key kernels' launch shapes (query tile, warps; forward and backward) on the
shapes they take, and writes them to <out>/short_keys_sweep.json.

Writes <out>/attention_kernels.json; prints one line per (shape, kernel): milliseconds per forward +
backward (the kernels' device time) and achieved TFLOP/s (2 * S_q * S_k * D multiply-adds per head and sample
for the forward, 2.5x that for the backward).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dfmkit.bench.timing import kernel_milliseconds
from dfmkit.kernels import short_keys
from dfmkit.components.attention.base import VarlenParams
from dfmkit.components.attention.torch_backend import _varlen_fn

SHAPES = {  # name: (samples, heads, query tokens, key tokens, head dim)
    "self 128x256": (128, 16, 256, 256, 72),
    "cross 128x256->77": (128, 16, 256, 77, 72),
    "self 15x1024": (15, 16, 1024, 1024, 72),
    "cross 15x1024->10": (15, 16, 1024, 10, 72),
    "self 256x64": (256, 16, 64, 64, 72),  # DiT-XL on 128-pixel images
}
BACKENDS = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="attention_results")
    parser.add_argument("--sweep", action="store_true", help="also time the short-key kernels' launch shapes")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES to time")
    args = parser.parse_args()
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from {list(SHAPES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, sweep = [], []
    for name in args.shapes.split(","):
        shape_rows, sweep_shape = time_shape(name, *SHAPES[name])
        rows += shape_rows
        if args.sweep and sweep_shape is not None:
            sweep += sweep_shape()
    (out / "attention_kernels.json").write_text(json.dumps({"torch": torch.__version__,
                                                            "device": torch.cuda.get_device_name(), "rows": rows},
                                                           indent=2))
    if args.sweep:
        (out / "short_keys_sweep.json").write_text(json.dumps(sweep, indent=2))
    return 0


def time_shape(name: str, n: int, h: int, sq: int, sk: int, d: int):
    """``(rows, sweep)``: a row per kernel with its milliseconds per forward + backward (or the error it raised) on
    ``n`` segments of ``sq`` queries and ``sk`` keys, ``h`` heads of ``d`` channels; ``sweep()`` times the short-key
    kernels' launch shapes where they take the shape (else ``sweep`` is None)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(n, h, sq, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    k = torch.randn(n, h, sk, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    v = torch.randn(n, h, sk, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    grad = torch.randn(n, h, sq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    flops = 3.5 * 4 * n * h * sq * sk * d
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())

    def run_batched(backend):
        def step():
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v)
            out.backward(grad)
            return out
        return step

    packed = [t.detach().transpose(1, 2).reshape(-1, h, d).requires_grad_() for t in (q, k, v)]
    packed_grad = grad.transpose(1, 2).reshape(-1, h, d)  # made once: a copy in the step would be timed
    params = VarlenParams.from_host(list(range(0, n * sq + 1, sq)), list(range(0, n * sk + 1, sk)), "cuda")

    def run_varlen():
        out = _varlen_fn()(*packed, params)
        out.backward(packed_grad)
        return out.view(n, sq, h, d).transpose(1, 2)

    # The layout the DiT hands over: [N, S, H, D] memory viewed as [N, H, S, D] (q, k, v split from one projection).
    strided = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    strided_grad = grad.transpose(1, 2).contiguous().transpose(1, 2)

    def run_cudnn_strided():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(*strided)
        out.backward(strided_grad)
        return out

    def run_short_keys():
        out = short_keys.attention(*packed, params)
        out.backward(packed_grad)
        return out.view(n, sq, h, d).transpose(1, 2)

    kernels = [("flash-varlen", run_varlen)] + [(b, run_batched(e)) for b, e in BACKENDS.items()]
    if short_keys.takes(*packed, params):
        kernels.append(("dfmkit-short-keys", run_short_keys))

    def without_accumulation(step):  # gradients land in fresh tensors, not added to the last call's
        def run():
            for t in (q, k, v, *packed, *strided):
                t.grad = None
            return step()
        return run

    rows = []
    for kernel, step in kernels + [("sdpa-cudnn-bshd", run_cudnn_strided)]:
        row = {"shape": name, "kernel": kernel}
        step = without_accumulation(step)
        try:
            error = (step().float() - reference).abs().max().item()
            ms = kernel_milliseconds(step)
            row.update(ms=ms, tflops=flops / ms / 1e9, max_error=error)
        except Exception as exc:  # a backend that does not support the shape: recorded, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not short_keys.takes(*packed, params):
        return rows, None
    forward = lambda: short_keys.attention(*(t.detach() for t in packed), params)  # noqa: E731
    return rows, lambda: sweep_short_keys(name, without_accumulation(run_short_keys), forward, sk, d, flops)


def sweep_short_keys(name: str, step, forward, keys: int, head_dim: int, flops: float) -> list[dict]:
    """Forward + backward milliseconds (and the forward's alone) of the short-key kernels for each forward launch
    shape (backward as set) and each backward shape (forward as set); the module's
    table is left as it was."""
    block_k = short_keys._blocks(head_dim, keys)[2]
    kept = short_keys.LAUNCH[block_k]
    shapes = [("forward", (q, w, *kept[2:])) for q in (16, 32, 64, 128) for w in (2, 4, 8)]
    shapes += [("backward", (*kept[:2], q, w)) for q in (16, 32, 64, 128) for w in (2, 4, 8)]
    rows = []
    for part, shape in shapes:
        short_keys.LAUNCH[block_k] = shape
        row = {"shape": name, "block_k": block_k, "launch": shape, "varied": part}
        try:
            ms = kernel_milliseconds(step)
            row.update(ms=ms, tflops=flops / ms / 1e9, forward_ms=kernel_milliseconds(forward))
        except Exception as exc:  # out of shared memory or registers: recorded, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    short_keys.LAUNCH[block_k] = kept
    return rows


if __name__ == "__main__":
    sys.exit(main())
