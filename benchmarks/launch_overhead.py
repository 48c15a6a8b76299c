"""Host microseconds per launch of dfmkit's Triton kernels, by layer of the call: what the host spends before
the GPU gets the work.

    python benchmarks/launch_overhead.py [--out results/]

A profiled DiT-XL step on an H200 showed the host behind the GPU in the forward pass, with the custom
operators ``dfmkit::adaln_forward`` and ``dfmkit::split_heads_forward`` taking 200-470 us of host time each
(``trace_gaps.py``). This times, on packs small enough that the GPU never holds the host up, each layer of such
a call: the operator as inductor's code calls it (``torch.ops.dfmkit...``: dispatcher, custom-op wrapper,
allocations, Triton launch), the bare Python function under it (allocations and Triton launch), and the
Triton launch alone into preallocated outputs; an aten kernel launch (``torch.neg(out=)``) for scale.
Writes <out>/launch_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dfmkit.kernels import adaln, qkv
from dfmkit.components.backbones.dit import rope3d


def host_us(fn, calls: int = 300) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * seconds / calls


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="launch_results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    width, samples, tokens = 1152, 2, 256  # DiT-XL's width; few tokens, so every kernel is short
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, generator=g)
    mod = torch.randn(samples, 3 * width, device="cuda", dtype=torch.bfloat16, generator=g)
    shift, scale, gate = mod.chunk(3, dim=-1)
    ids = torch.arange(samples, device="cuda").repeat_interleave(tokens // samples)
    eps = 1e-6

    n_rows, block_d = tokens, adaln._block_d(width)
    block_m = max(1, adaln.FORWARD_ELEMENTS // block_d)
    m, mean, rstd = torch.empty_like(x), x.new_empty(n_rows, dtype=torch.float32), x.new_empty(n_rows, dtype=torch.float32)

    def triton_only():
        adaln._forward[(adaln.triton.cdiv(n_rows, block_m),)](
            x, x, ids, scale, shift, scale, m, m, mean, rstd, n_rows, scale.stride(0), eps, D=width,
            BLOCK_D=block_d, BLOCK_M=block_m, RESIDUAL=False, num_warps=adaln.FORWARD_WARPS)

    heads, head_dim = 16, width // 16
    src = torch.randn(tokens, 1, 3 * width, device="cuda", dtype=torch.bfloat16, generator=g)
    weights = [torch.ones(head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    pos = torch.randint(0, 16, (tokens, 3), device="cuda", generator=g)
    cos, sin = (t.contiguous() for t in rope3d(pos, head_dim, 10000.0, torch.bfloat16))
    neg_out = torch.empty_like(x)
    rows = {
        "adaln_forward: torch.ops (as compiled code calls it)":
            lambda: torch.ops.dfmkit.adaln_forward(x, None, None, shift, scale, ids, eps),
        "adaln_forward: the Python function (allocations + launch)":
            lambda: adaln._launch_forward._init_fn(x, None, None, shift, scale, ids, eps),
        "adaln_forward: Triton launch alone": triton_only,
        "split_heads_forward: torch.ops": lambda: torch.ops.dfmkit.split_heads_forward(src, weights, True, heads, eps, cos, sin),
        "split_heads_forward: the Python function": lambda: qkv._launch_forward._init_fn(src, weights, True, heads, eps, cos, sin),
        "aten launch, torch.neg(out=)": lambda: torch.neg(x, out=neg_out),
        "aten allocation, torch.empty_like": lambda: torch.empty_like(x),
    }
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": adaln.triton.__version__,
               "host_us": {}}
    for name, fn in rows.items():
        try:
            results["host_us"][name] = round(host_us(fn), 1)
        except Exception as exc:  # report the failing layer and time the others
            results["host_us"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(json.dumps({name: results["host_us"][name]}), flush=True)
    (out / "launch_overhead.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
