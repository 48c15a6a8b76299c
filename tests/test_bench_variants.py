"""benchmarks/sampling_variants.py and benchmarks/validation_graphs.py in their --tiny modes on the CPU: every variant
either times the guided evaluation or says it needs CUDA, and the ratios are to the baseline; validation runs both
ways within a training run, with the same samples where nothing is captured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def cpu_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_tiny_variants_time_the_evaluation_or_say_what_they_need(tmp_path):
    out = tmp_path / "variants.json"
    env = cpu_env()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sampling_variants.py"), "--tiny", "--images", "2",
                           "--replays", "2", "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["images"] == 2 and results["cuda_graphs"] is False
    timed = {name: ms for name, ms in results["ms_per_evaluation"].items() if isinstance(ms, float)}
    assert {"baseline", "no-null-text-skip", "unfused-gelu", "recomputed-text-keys", "baseline-again"} <= set(timed)
    assert all(ms > 0 for ms in timed.values())
    assert results["ms_per_evaluation"]["cublaslt"] == "needs CUDA"
    assert results["ratio_to_baseline"]["baseline"] == 1.0 and set(results["ratio_to_baseline"]) == set(timed)
    assert "baseline:" in done.stdout and "cublaslt: needs CUDA" in done.stdout


def test_tiny_validation_graphs_times_both_ways_within_a_training_run(tmp_path):
    out = tmp_path / "validation.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "validation_graphs.py"), "--tiny", "--train-steps",
                           "1", "--out", str(out)], capture_output=True, text=True, env=cpu_env(), cwd=tmp_path,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["tiny"] is True
    assert [row["cuda_graphs"] for row in results["validations"]] == [True, False, False, True]
    assert all(row["seconds"] > 0 for row in results["validations"])
    assert results["latents_max_difference"] == [0.0, 0.0]  # nothing is captured on a CPU: the same sampling
    assert len(results["train_step_ms_after"]) == 2 and len(results["train_step_ms_before"]) == 1
