"""Time the DiT's Triton kernels (dfmkit.kernels.adaln, .qkv) alone on DiT-XL shapes over a sweep of launch
shapes, as bandwidth against a device copy: the figures behind the launch settings at the top of each module.

Each kernel's bytes are what it must move at the least (bf16 tensors read and written once); per-sample
vectors and norm statistics are left out. Times are the device time of the kernels a call launches
(:func:`dfmkit.bench.timing.kernel_milliseconds`). Writes <out>/fused_kernels.json and prints the best
setting of each kernel.

    python benchmarks/fused_kernels.py --out results/ [--tokens 32768 --hidden 1152 --heads 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dfmkit.bench.timing import copy_bandwidth, kernel_milliseconds
from dfmkit import kernels
from dfmkit.components.backbones.dit import Segments, rope3d


def seconds(fn) -> float:
    return kernel_milliseconds(fn) / 1e3


def adaln_case(tokens: int, hidden: int, samples: int, residual: bool):
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    ids = torch.repeat_interleave(torch.arange(samples, device="cuda"), tokens // samples)
    seg = Segments(ids, samples)
    mod = torch.randn(samples, 9 * hidden, **bf16, requires_grad=True)
    gate, shift, scale = mod[:, :hidden], mod[:, hidden : 2 * hidden], mod[:, 2 * hidden : 3 * hidden]
    x = torch.randn(tokens, 1, hidden, **bf16, requires_grad=True)
    h = torch.randn(tokens, 1, hidden, **bf16, requires_grad=True)
    one = tokens * hidden * 2
    if residual:
        forward = lambda: kernels.adaln.residual_norm_modulate(x, h, gate, shift, scale, seg, 1e-6)  # noqa: E731
        outs, inputs, moved = forward(), (x, h, gate, shift, scale), (4 * one, 6 * one)
    else:
        forward = lambda: (kernels.adaln.norm_modulate(x, shift, scale, seg, 1e-6),)  # noqa: E731
        outs, inputs, moved = forward(), (x, shift, scale), (2 * one, 3 * one)
    grads = [torch.randn_like(o) for o in outs]
    backward = lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True)  # noqa: E731
    return forward, backward, moved


def qkv_case(tokens: int, hidden: int, heads: int):
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    head_dim = hidden // heads
    qkv = torch.randn(tokens, 1, 3 * hidden, **bf16, requires_grad=True)
    wq, wk = (torch.ones(head_dim, **bf16, requires_grad=True) for _ in range(2))
    side = int(round((tokens // 128) ** 0.5))
    pos = torch.stack([torch.zeros(tokens), torch.arange(tokens) // side % side, torch.arange(tokens) % side], 1)
    rope = rope3d(pos.long().cuda(), head_dim, 10000.0, torch.bfloat16)
    forward = lambda: kernels.qkv.split_qkv(qkv, heads, wq, wk, 1e-6, rope)  # noqa: E731
    outs = forward()
    grads = [torch.randn_like(o) for o in outs]
    backward = lambda: torch.autograd.grad(outs, (qkv, wq, wk), grads, retain_graph=True)  # noqa: E731
    one = tokens * hidden * 2
    return forward, backward, (6 * one, 8 * one)


def cross_query_case(tokens: int, hidden: int, heads: int):
    """Cross-attention's query norm (norm_heads): one projection in, one normed tensor out."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, 1, hidden, **bf16, requires_grad=True)
    weight = torch.ones(hidden // heads, **bf16, requires_grad=True)
    forward = lambda: (kernels.qkv.norm_heads(x, heads, weight, 1e-6),)  # noqa: E731
    outs = forward()
    grads = [torch.randn_like(o) for o in outs]
    backward = lambda: torch.autograd.grad(outs, (x, weight), grads, retain_graph=True)  # noqa: E731
    one = tokens * hidden * 2
    return forward, backward, (2 * one, 3 * one)


SWEEPS = {
    "adaln": (kernels.adaln, {"FORWARD_ELEMENTS": [2048, 4096, 8192, 16384], "FORWARD_WARPS": [2, 4, 8],
                              "BACKWARD_WARPS": [1, 2, 4, 8],
                              "BACKWARD_ROWS": [16, 32, 64, 128]}),
    "qkv": (kernels.qkv, {"TOKENS_PER_TILE": [1, 2, 4, 8], "FORWARD_WARPS": [2, 4, 8],
                          "BACKWARD_WARPS": [1, 2, 4, 8], "TILES_PER_PROGRAM": [2, 4, 8, 16]}),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=1152)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()
    ceiling = copy_bandwidth(args.tokens * args.hidden * 4)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": ceiling / 1e9, "rows": []}
    cases = {
        "adaln residual": ("adaln", lambda: adaln_case(args.tokens, args.hidden, args.samples, True)),
        "adaln plain": ("adaln", lambda: adaln_case(args.tokens, args.hidden, args.samples, False)),
        "qkv": ("qkv", lambda: qkv_case(args.tokens, args.hidden, args.heads)),
        "cross query norm": ("qkv", lambda: cross_query_case(args.tokens, args.hidden, args.heads)),
    }
    for name, (kind, make) in cases.items():
        module, sweep = SWEEPS[kind]
        defaults = {k: getattr(module, k) for k in sweep}
        # one knob at a time around the defaults: the forward knobs and the backward knobs do not interact
        settings = [dict(defaults)] + [{**defaults, k: v} for k, values in sweep.items() for v in values if v != defaults[k]]
        for setting in settings:
            for k, v in setting.items():
                setattr(module, k, v)
            try:
                forward, backward, (fwd_bytes, bwd_bytes) = make()
                fwd, bwd = seconds(forward), seconds(backward)
            except Exception as error:  # a launch shape the kernel cannot take (registers, shared memory)
                results["rows"].append({"kernel": name, **setting, "error": repr(error)[:200]})
                continue
            row = {"kernel": name, **setting, "forward_us": 1e6 * fwd, "backward_us": 1e6 * bwd,
                   "forward_of_copy": fwd_bytes / fwd / ceiling, "backward_of_copy": bwd_bytes / bwd / ceiling}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        for k, v in defaults.items():
            setattr(module, k, v)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fused_kernels.json").write_text(json.dumps(results, indent=2))
    print(f"{results['device']}, torch {results['torch']}, copy {ceiling / 1e9:.0f} GB/s")
    for name in cases:
        rows = [r for r in results["rows"] if r["kernel"] == name and "error" not in r]
        for phase in ("forward", "backward"):
            best = min(rows, key=lambda r: r[f"{phase}_us"])
            knobs = {k: best[k] for k in SWEEPS[cases[name][0]][1]}
            print(f"{name} {phase}: default {rows[0][f'{phase}_us']:.0f} us ({rows[0][f'{phase}_of_copy']:.0%} of copy), "
                  f"best {best[f'{phase}_us']:.0f} us ({best[f'{phase}_of_copy']:.0%}) with {knobs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
