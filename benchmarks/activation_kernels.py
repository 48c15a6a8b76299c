"""Time the MLP's GELU on its DiT-XL shape (tokens x 4 x hidden, bf16), compiled, forward and backward, against a
device copy: is a GELU kernel bound by memory or by the arithmetic of its erf?

Variants: inductor's ``F.gelu`` (erf, the DiT's); the same function through Numerical Recipes' erfc fit (tried for
the DiT and not kept: slower forward in isolation, and in the XL step its kernels took 25 ms against 15 ms, on an
H200); the tanh approximation (a different function, for scale); and ``x * 1.5`` (the same bytes and next to no
arithmetic). Bytes are what the pass must move at the least: forward reads x and writes y; backward reads the
gradient and x and writes x's gradient; "correctly rounded" is the share of bf16 outputs equal to float64 GELU
rounded to bf16. Times are the kernels' device time
(:func:`dfmkit.bench.timing.kernel_milliseconds`), fresh gradients on every call. Writes <out>/activation_kernels.json.

    python benchmarks/activation_kernels.py --out results/ [--tokens 32768 --width 4608]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dfmkit.bench.timing import kernel_milliseconds

# Numerical Recipes' erfc (Chebyshev fit, relative error below 1.2e-7 for z >= 0): erfc(z) = t exp(-z^2 + P(t)),
# t = 1 / (1 + z / 2), P's coefficients from the constant term up. Phi(-|x|) from erfc keeps its relative accuracy
# in the negative tail, where 0.5 (1 + erf(x / sqrt 2)) cancels (its bf16 results were all correctly rounded).
_ERFC_POLY = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
              -0.82215223, 0.17087277)


def _cdf_and_density(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = x.abs() * 0.7071067811865476
    t = 1 / (1 + 0.5 * z)
    poly = torch.full_like(t, _ERFC_POLY[-1])
    for c in reversed(_ERFC_POLY[:-1]):
        poly = poly * t + c
    gauss = torch.exp(-z * z)
    tail = 0.5 * t * torch.exp(poly) * gauss
    return torch.where(x >= 0, 1 - tail, tail), gauss * 0.3989422804014327


class ErfcGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x.float() * _cdf_and_density(x.float())[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        cdf, density = _cdf_and_density(x.float())
        return (grad.float() * (cdf + x.float() * density)).to(grad.dtype)


VARIANTS = {
    "F.gelu (erf)": F.gelu,
    "erfc fit (not kept)": ErfcGELU.apply,
    "tanh approximation": lambda x: F.gelu(x, approximate="tanh"),
    "x * 1.5 (bytes only)": lambda x: x * 1.5,
}


def measure(fn, tokens: int, width: int) -> dict:
    compiled = torch.compile(fn)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    forward_ms = kernel_milliseconds(lambda: compiled(x.detach()))
    both_ms = kernel_milliseconds(lambda: torch.autograd.grad(compiled(x), x, grad))
    one = x.numel() * x.element_size()
    backward_ms = both_ms - forward_ms
    exact = (x.double() * 0.5 * torch.special.erfc(-x.double() / 2**0.5)).bfloat16()
    return {"forward_ms": forward_ms, "backward_ms": backward_ms,
            "correctly_rounded": (compiled(x.detach()) == exact).double().mean().item(),
            "forward_GBps": 2 * one / forward_ms / 1e6, "backward_GBps": 3 * one / backward_ms / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="activation_results")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--width", type=int, default=4608)
    args = parser.parse_args()
    src = torch.empty(args.tokens * args.width, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_GBps = 2 * src.numel() * 2 / kernel_milliseconds(lambda: dst.copy_(src)) / 1e6
    rows = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": copy_GBps}
    print(f"{rows['device']}, torch {rows['torch']}; copy {copy_GBps:.0f} GB/s; {args.tokens} x {args.width} bf16")
    for name, fn in VARIANTS.items():
        row = rows[name] = measure(fn, args.tokens, args.width)
        print(f"  {name:22s} forward {row['forward_ms']:.3f} ms ({row['forward_GBps'] / copy_GBps:4.0%} of copy), "
              f"backward {row['backward_ms']:.3f} ms ({row['backward_GBps'] / copy_GBps:4.0%}); bf16 outputs correctly "
              f"rounded: {row['correctly_rounded']:.2%}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "activation_kernels.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
