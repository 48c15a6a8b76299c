"""Where a DiT training step makes the host wait for the GPU: every synchronizing CUDA call of one step.

    python benchmarks/host_syncs.py [--preset S] [--case a|b] [--compile]

Runs two warm-up steps of the real training step (mock packs, as ``benchmarks/gpu_throughput.py``), then
one step under CUDA's sync debug mode, and prints each call site (the innermost dfmkit and megatron
frames) with how often it synchronized. A sync empties the host's lead over the GPU: the kernels
launched after it start on an idle GPU. The model size does not change the list; S is quick.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import threading
import traceback
import warnings

import torch

from dfmkit.bench.matrix import THROUGHPUT_CASES as CASES, Layout, make_trainer


def call_site() -> str:
    """The innermost three dfmkit or megatron frames of the sync; else the innermost three of any code
    (torch's own, say), and where there is no Python frame at all, the thread: a backward op runs on
    the autograd engine's thread without one."""
    frames = [f for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename]
    named = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames]
    ours = [name for name, f in zip(named, frames) if "dfmkit" in f.filename or "megatron" in f.filename]
    if ours:
        return " <- ".join(reversed(ours[-3:]))
    inner = [name for name in named if "host_syncs.py" not in name]
    if inner:
        return "(outside dfmkit and megatron) " + " <- ".join(reversed(inner[-3:]))
    return f"(no Python frame: thread {threading.current_thread().name}; a backward op if not the main thread)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="S")
    parser.add_argument("--case", default="b", choices=sorted(CASES))
    parser.add_argument("--attention", default="torch")
    parser.add_argument("--compile", action="store_true", help="model.compile (torch.compile of each DiT layer)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("host_syncs: needs a CUDA GPU", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(args.preset, Layout(), text_dim=1024, attention=args.attention, workdir=workdir,
                               steps=100, model={"compile": args.compile}, **CASES[args.case])
        for _ in range(2):
            trainer.train_step()
        torch.cuda.synchronize()
        sites: collections.Counter[str] = collections.Counter()
        previous = warnings.showwarning
        warnings.showwarning = lambda *_args, **_kwargs: sites.update([call_site()])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = previous
    print(f"{sum(sites.values())} host syncs in one training step ({args.preset}, case {args.case})")
    for site, count in sites.most_common():
        print(f"{count:4d}  {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
