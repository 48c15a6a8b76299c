"""Packed attention kernels on one GPU: flash varlen, batched SDPA backends and dfmkit's Triton kernels, forward +
backward.

The DiT's packs of equal-size images can run attention as one batch ``[N, H, S, D]`` instead of a
varlen call; this measures which kernel is fastest for the shapes of the throughput cases (DiT-XL: 16
heads of 72 channels; self-attention over 256 or 1024 tokens, cross-attention to 77 or 10 text tokens).

    python benchmarks/attention_kernels.py --out results/ [--sweep]

Writes <out>/attention_kernels.json; prints one line per (shape, kernel): milliseconds per forward +
backward (the kernels' device time) and achieved TFLOP/s (2 * S_q * S_k * D multiply-adds per head and sample
for the forward, 2.5x that for the backward). ``--sweep`` first tries launch shapes for each of the Triton
kernels (triton_backend.LAUNCH: one set per key-length bucket) on the shape of its bucket, keeps the fastest,
writes them to <out>/attention_launch.json (``gpu_throughput.py --attention-launch`` reads it) and then times.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dfmkit.bench.timing import cuda_milliseconds, kernel_milliseconds
from dfmkit.components.attention import triton_backend
from dfmkit.components.attention.base import VarlenParams
from dfmkit.components.attention.torch_backend import _varlen_fn

SHAPES = {  # name: (samples, heads, query tokens, key tokens, head dim)
    "self 128x256": (128, 16, 256, 256, 72),
    "cross 128x256->77": (128, 16, 256, 77, 72),
    "self 15x1024": (15, 16, 1024, 1024, 72),
    "cross 15x1024->10": (15, 16, 1024, 10, 72),
}
# The shape each launch bucket of triton_backend.LAUNCH is swept on (its largest case).
SWEEP_SHAPES = {128: "cross 128x256->77", 512: "self 128x256", None: "self 15x1024"}
CANDIDATES = {
    "forward": [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m in (64, 128) for n in (32, 64, 128)
                for w in (4, 8) for st in (2, 3)],
    "dq": [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=2) for m in (32, 64, 128) for n in (32, 64)
           for w in (4, 8)],
    "dkdv": [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=2) for m in (32, 64) for n in (32, 64, 128)
             for w in (4, 8)],
}
BACKENDS = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def packed_inputs(name: str):
    """Contiguous packed ``q [Tq, H, D]``, ``k, v [Tk, H, D]``, an output gradient and their VarlenParams."""
    n, h, sq, sk, d = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, grad = (torch.randn(n * sq, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    k, v = (torch.randn(n * sk, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    params = VarlenParams.from_host(list(range(0, n * sq + 1, sq)), list(range(0, n * sk + 1, sk)), "cuda")
    return q, k, v, grad, params


def sweep_launch_shapes() -> dict:
    """For each bucket and kernel, the candidate launch shape with the least device time (the other two kernels
    at their current shapes); failures (too much shared memory) are skipped. Sets and returns LAUNCH."""
    for limit, name in SWEEP_SHAPES.items():
        q, k, v, grad, p = packed_inputs(name)
        args = (p.cu_seqlens_q, p.cu_seqlens_k)
        out, lse = triton_backend.run_forward(q, k, v, *args, p.max_seqlen_q, triton_backend.LAUNCH[limit]["forward"])
        _, delta = triton_backend.run_backward_dq(q, k, v, out, lse, grad, *args, p.max_seqlen_q,
                                                  triton_backend.LAUNCH[limit]["dq"])
        runs = {
            "forward": lambda c: triton_backend.run_forward(q, k, v, *args, p.max_seqlen_q, c),
            "dq": lambda c: triton_backend.run_backward_dq(q, k, v, out, lse, grad, *args, p.max_seqlen_q, c),
            "dkdv": lambda c: triton_backend.run_backward_dkdv(q, k, v, grad, lse, delta, *args, p.max_seqlen_k, c),
        }
        for kernel, run in runs.items():
            timed = []
            for config in CANDIDATES[kernel]:
                try:
                    timed.append((cuda_milliseconds(lambda: run(config), repeats=10, warmup=2), config))
                except Exception as exc:  # a shape this GPU cannot launch: not a candidate
                    print(f"sweep {name} {kernel} {config}: {type(exc).__name__}", flush=True)
            if not timed:
                print(json.dumps({"sweep": name, "kernel": kernel, "error": "no candidate ran"}), flush=True)
                continue
            timed.sort(key=lambda t: t[0])
            best = dict(timed[0][1])
            triton_backend.LAUNCH[limit][kernel] = best
            print(json.dumps({"sweep": name, "kernel": kernel, "best": best, "ms": timed[0][0],
                              "worst_ms": timed[-1][0], "tried": len(timed)}), flush=True)
    return triton_backend.LAUNCH


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="attention_results")
    parser.add_argument("--sweep", action="store_true", help="sweep the Triton kernels' launch shapes first")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        launch = sweep_launch_shapes()
        (out / "attention_launch.json").write_text(json.dumps({str(k): v for k, v in launch.items()}, indent=2))
    rows = []
    for name, (n, h, sq, sk, d) in SHAPES.items():
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

        def run_triton():
            out = triton_backend.flash_attention(*packed, params)
            out.backward(packed_grad)
            return out.view(n, sq, h, d).transpose(1, 2)

        kernels = [("flash-varlen", run_varlen), ("triton", run_triton)] + [(b, run_batched(e))
                                                                           for b, e in BACKENDS.items()]

        def without_accumulation(step):  # gradients land in fresh tensors, not added to the last call's
            def run():
                for t in (q, k, v, *packed, *strided):
                    t.grad = None
                return step()
            return run

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
    (out / "attention_kernels.json").write_text(json.dumps({"torch": torch.__version__,
                                                            "device": torch.cuda.get_device_name(), "rows": rows},
                                                           indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
