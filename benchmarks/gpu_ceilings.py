"""The two ceilings of the GPU at hand: bf16 matrix-product rate and device-memory bandwidth.

    python benchmarks/gpu_ceilings.py [--min-tflops 550]

A large bf16 product (8192^3, cuBLAS, timed with CUDA events after a warm-up) and a 1 GiB device-to-device copy
(bytes read + written, its kernel's device time: dfmkit.bench.timing.copy_bandwidth). MFU figures are against
the datasheet's 989 TFLOP/s; these are what the machine actually reaches, and a quick check that a lent machine
is healthy before benchmarking on it (exit status 3 when the product runs below ``--min-tflops``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from dfmkit.bench.timing import copy_bandwidth, cuda_milliseconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-tflops", type=float, default=0.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_ceilings: needs a CUDA GPU", file=sys.stderr)
        return 2
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    tflops = 2 * n**3 / (cuda_milliseconds(lambda: a @ b, 20) / 1e3) / 1e12
    gbps = copy_bandwidth() / 1e9
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: bf16 matmul {tflops:.0f} TFLOP/s, "
          f"copy {gbps:.0f} GB/s")
    return 3 if tflops < args.min_tflops else 0


if __name__ == "__main__":
    sys.exit(main())
