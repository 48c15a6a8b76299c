"""Where the GPU waits in a profiled step: the idle gaps of a chrome trace and what the host did meanwhile.

    python benchmarks/trace_gaps.py profile_results/trace_a_compile.json.gz [--min-us 50] [--most 25]

Reads a trace written by ``gpu_profile.py --trace`` (torch.profiler's chrome trace), merges the intervals of
all kernels, copies and memsets into the GPU's busy time, and prints the gaps longer than ``--min-us``,
largest first: how long, the kernel before and after, whether the kernel after was launched late (its launch
call began after the gap opened: the host was behind) or early (the GPU was held up by something else), and
the host calls that overlap the gap (synchronizing calls first). The total idle time splits into these two
kinds, which say whether to work on the host (launch cost, syncs) or on the device.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from bisect import bisect_right

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"cuda_runtime", "cuda_driver", "cpu_op", "user_annotation", "python_function"}
SYNCS = ("Synchronize", "cudaMemcpy ", "cudaMemcpy\0", "Command Buffer Full")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def gaps(events: list[dict], min_us: float) -> tuple[list[dict], float, float]:
    """The GPU's idle gaps over ``min_us`` between its first and last kernel, the busy and the spanned time."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e), key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "args" in e}
    host = sorted((e for e in events if e.get("cat") in HOST_CATEGORIES and "dur" in e), key=lambda e: e["ts"])
    host_starts = [e["ts"] for e in host]
    found, busy, end, previous = [], 0.0, None, None
    for event in gpu:
        start, stop = event["ts"], event["ts"] + event["dur"]
        if end is not None and start - end > min_us:
            launch = launches.get(event.get("args", {}).get("correlation"))
            # host calls that began before the gap closed and ended after it opened
            window = host[:bisect_right(host_starts, start)]
            overlapping = [h for h in window[-2000:] if h["ts"] + h["dur"] > end]
            overlapping.sort(key=lambda h: (not any(s in h["name"] for s in SYNCS), -h["dur"]))
            found.append({
                "gap_us": round(start - end, 1), "at_us": round(end - gpu[0]["ts"], 1),
                "before": previous["name"][:70], "after": event["name"][:70],
                "launched_late": launch is not None and launch["ts"] > end,
                "host": [f'{h["name"][:60]} ({h["dur"]:.0f} us)' for h in overlapping[:4]],
            })
        busy += stop - start if end is None or start >= end else max(0.0, stop - end)
        end = stop if end is None else max(end, stop)
        previous = event
    return found, busy, (end - gpu[0]["ts"]) if gpu else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--min-us", type=float, default=50.0)
    parser.add_argument("--most", type=int, default=25)
    args = parser.parse_args()
    found, busy, span = gaps(load(args.trace), args.min_us)
    late = sum(g["gap_us"] for g in found if g["launched_late"])
    early = sum(g["gap_us"] for g in found if not g["launched_late"])
    print(f"GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {(span - busy) / 1e3:.1f} ms; "
          f"gaps over {args.min_us:.0f} us: {len(found)}, {late / 1e3:.1f} ms waiting for a late launch, "
          f"{early / 1e3:.1f} ms with the next kernel already launched")
    for g in sorted(found, key=lambda g: -g["gap_us"])[:args.most]:
        print(json.dumps(g))
    return 0


if __name__ == "__main__":
    sys.exit(main())
