"""benchmarks/sampling_vs_pixart.py in its --tiny mode on the CPU: each case runs in its own process and comes back
with its timings and counted model evaluations; the ratio is dfmkit / PixArt seconds per image; a case that cannot
run (a keyword sampling_latency does not take) or fails (times out) is reported and the benchmark goes on."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).parents[1]
STEPS = 3


def _benchmark(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "results" / "sampling_vs_pixart.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sampling_vs_pixart.py"), "--tiny",
                           "--steps", str(STEPS), "--out", str(out), *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    return done, json.loads(out.read_text())


def test_tiny_cases_time_both_samplers_and_their_ratio(tmp_path):
    done, results = _benchmark(tmp_path, "--images", "2", "--cases", "dfmkit-eager,pixart-eager", "--repeats", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert results["device"] == "cpu" and results["diffusers"] == diffusers.__version__
    assert results["dfmkit_commit"]
    dfmkit, pixart = results["cases"]
    for case in (dfmkit, pixart):
        assert case["status"] == "ok" and case["images"] == 2 and case["steps"] == STEPS
        assert all(s > 0 for s in case["timed_seconds"])
        assert case["seconds"] == statistics.median(case["timed_seconds"])
        assert case["seconds_per_image"] == pytest.approx(case["seconds"] / 2)
        assert case["evaluations"] == 2 * STEPS - 1  # Heun, the last step Euler
        assert case["tokens_per_image"] == 16  # both tiny models see the same token counts
    # PixArt's side counts its model calls and times its first call apart from the two timed ones
    assert pixart["evaluations_counted"] and pixart["first_call_seconds"] > 0 and len(pixart["timed_seconds"]) == 2
    (ratio,) = results["ratios"]
    assert ratio["mode"] == "eager" and ratio["images"] == 2
    assert ratio["dfmkit_over_pixart"] == pytest.approx(dfmkit["seconds_per_image"] / pixart["seconds_per_image"])
    assert f"| 2 | eager | {dfmkit['seconds_per_image']:.3g}" in done.stdout
    assert f"| {ratio['dfmkit_over_pixart']:.2f} |" in done.stdout


def test_a_case_that_cannot_run_or_fails_is_reported_and_the_rest_go_on(tmp_path):
    done, results = _benchmark(tmp_path, "--images", "1", "--cases", "dfmkit-eager,pixart-eager",
                               "--dfmkit-kwargs", '{"no_such_keyword": 1}', "--timeout", "0.5")
    assert done.returncode == 1  # a failed case; "not supported" alone would not fail the run
    dfmkit, pixart = results["cases"]
    assert dfmkit["status"] == "not supported" and "'no_such_keyword'" in dfmkit["error"]
    assert pixart["status"] == "failed" and pixart["error"] == "timed out after 0.5 s"
    assert results["ratios"] == []
    assert "| 1 | eager | not supported | failed | - |" in done.stdout
    assert "pixart-eager, 1 image(s): failed: timed out after 0.5 s" in done.stdout
