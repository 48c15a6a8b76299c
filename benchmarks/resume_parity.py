"""A real `dfmkit run` under torchrun, stopped by SIGTERM part-way and resumed, against an uninterrupted run.

    python benchmarks/resume_parity.py --nproc 4 --tensor 2 --context 2 --steps 8 --stop-after 3 --out results/

Runs `torchrun -m dfmkit.cli run RECIPE --mock` twice in the chosen layout: once straight through, once
sent SIGTERM (through torchrun, to every rank) as soon as step ``--stop-after`` is logged (the trainer
finishes the step it is in, saves and exits) and then started again on the same checkpoint folder,
which resumes it (torchrun's own exit status after the signal is non-zero; the trainer's "stopped by
signal ... at step k" line is what is checked). Compares the loss and gradient norm of every step, read from each run's TensorBoard
events, and writes <out>/resume_parity.json. Exit status 1 when they differ by more than ``--rtol``
(0 asks for bitwise equality, which CPU runs give).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def command(args, folder: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "-m", "dfmkit.cli", "run",
        args.recipe, "--mock", f"parallel.tensor={args.tensor}", f"parallel.context={args.context}",
        f"parallel.sequence={str(args.sequence).lower()}", f"train.train_iters={args.steps}", "train.log_interval=1",
        f"checkpoint.dir={folder}", "checkpoint.save_interval=0", "validation.interval=0", "logging.progress=false",
        "optim.warmup_iters=1", *extra,
    ]


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[int, float]] = {"train/loss": {}, "train/grad_norm": {}}
    for events in sorted((folder / "tensorboard").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag, values in found.items():
            if tag in accumulator.Tags()["scalars"]:
                values.update({e.step: e.value for e in accumulator.Scalars(tag)})
    return found


def run(cmd: list[str], log: Path, stop_after: int | None = None) -> tuple[int, int | None]:
    """Run ``cmd``; with ``stop_after``, SIGTERM its process group once that step is logged. Returns the
    exit status and the step at which the signal went out."""
    signalled = None
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        for line in process.stdout:
            out.write(line)
            match = re.search(r"step (\d+)/\d+", line)
            if stop_after is not None and signalled is None and match and int(match.group(1)) >= stop_after:
                signalled = int(match.group(1))
                os.killpg(process.pid, signal.SIGTERM)
        return process.wait(), signalled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="quickstart_digits")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--tensor", type=int, default=2)
    parser.add_argument("--context", type=int, default=1)
    parser.add_argument("--sequence", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--stop-after", type=int, default=3)
    parser.add_argument("--rtol", type=float, default=0.0)
    parser.add_argument("--out", default="resume_results")
    parser.add_argument("overrides", nargs="*", help="more recipe overrides for both runs")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    whole_status, _ = run(command(args, out / "whole", args.overrides), out / "whole.log")
    first_status, signalled = run(command(args, out / "split", args.overrides), out / "split_1.log", args.stop_after)
    second_status, _ = run(command(args, out / "split", args.overrides), out / "split_2.log")
    whole, split = scalars(out / "whole"), scalars(out / "split")
    resumed_at = re.search(r"resumed from \S+ at step (\d+)", (out / "split_2.log").read_text())
    report = {
        "layout": {"nproc": args.nproc, "tensor": args.tensor, "context": args.context, "sequence": args.sequence},
        "steps": args.steps, "signal_sent_after_step": signalled,
        "resumed_at_step": int(resumed_at.group(1)) if resumed_at else None,
        "exit_status": {"whole": whole_status, "stopped": first_status, "resumed": second_status},
        "seconds": time.perf_counter() - start, "rows": [],
    }
    worst = 0.0
    for step in range(1, args.steps + 1):
        row = {"step": step}
        for tag in ("train/loss", "train/grad_norm"):
            a, b = whole[tag].get(step), split[tag].get(step)
            row[tag] = [a, b]
            if a is None or b is None:
                worst = float("inf")
            elif a != b:
                worst = max(worst, abs(a - b) / max(abs(a), 1e-30))
        report["rows"].append(row)
    report["max_relative_difference"] = worst
    # torchrun itself exits non-zero when it receives SIGTERM; what counts is that the trainer saved and stopped.
    stopped = re.search(r"stopped by signal \S+ at step (\d+)", (out / "split_1.log").read_text())
    report["stopped_at_step"] = int(stopped.group(1)) if stopped else None
    report["same"] = (worst <= args.rtol and stopped is not None and report["resumed_at_step"] is not None
                      and whole_status == 0 and second_status == 0)
    (out / "resume_parity.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    for row in report["rows"]:
        print(row)
    return 0 if report["same"] else 1


if __name__ == "__main__":
    sys.exit(main())
