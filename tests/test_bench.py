"""The benches on the CPU: the matrix (dfmkit.bench.matrix), a row's figures and the memory a case hands back; the
sampling latency (dfmkit.bench.sampling)."""

from __future__ import annotations

import gc
import json
import math

from dfmkit.bench.matrix import COLUMNS, Layout, run_case, to_markdown
from dfmkit.bench.sampling import sampling_latency
from dfmkit.components.backbones.dit import DiT


def _live_models() -> int:
    return sum(isinstance(o, DiT) for o in gc.get_objects())


def test_a_case_gives_its_figures_and_hands_its_model_back():
    """After a case no model of it stays alive (megatron's DDP hooks hold it in reference cycles): on a GPU a
    later case in the same process would otherwise start with the earlier one's weights, moments and EMA."""
    gc.collect()
    before = _live_models()
    row = run_case("tiny", Layout(), seq_length=64, latent_shape=(16, 1, 4, 4), text_tokens=5, text_dim=32,
                   samples_per_pack=4, attention="torch", warmup=2, steps=1, peak_tflops=1.0)
    assert _live_models() == before
    assert row["model"] == "tiny" and row["samples_per_pack"] == 4 and row["seq_length"] == 4 * 4  # 2x2 patches of 4x4
    assert row["tokens_per_s_per_gpu"] > 0 and row["tflops_per_gpu"] > 0 and math.isfinite(row["loss_step2"])


def test_a_cpu_row_says_what_it_does_not_know():
    """On the CPU no peak FLOP/s is known (MFU) and no peak memory is measured: the table says n/a and why,
    instead of 0.0% and nan, and the JSON holds null (NaN is not JSON)."""
    row = run_case("tiny", Layout(), seq_length=64, latent_shape=(16, 1, 4, 4), text_tokens=5, text_dim=32,
                   samples_per_pack=4, attention="torch", warmup=2, steps=1, peak_tflops=None)
    assert row["device"] == "cpu" and row["mfu"] is None and row["peak_memory_GiB"] is None
    assert row["tflops_per_gpu"] > 0
    json.dumps([row], allow_nan=False)
    table = to_markdown([row])
    cells = [c.strip() for c in table.splitlines()[2].split("|")[1:-1]]
    columns = [title for _, title in COLUMNS]
    assert cells[columns.index("MFU")] == "n/a" and cells[columns.index("peak mem (GiB)")] == "n/a"
    assert "MFU n/a: no peak FLOP/s known for cpu (give --peak-tflops)" in table
    assert "peak memory n/a: measured on CUDA only" in table


def test_bench_needs_no_mock_flag():
    from dfmkit.cli import parse_args

    assert parse_args(["bench"]).func is parse_args(["bench", "--mock"]).func
    assert parse_args(["bench"]).peak_tflops is None  # the device decides: 989 on CUDA (H100/H200), none on CPU


def test_sampling_latency_times_the_first_call_apart():
    """The first call (compilation, graph capture on a GPU) is reported apart from the timed one; the row says
    whether graphs ran (only on a GPU)."""
    row = sampling_latency("tiny", images=2, latent_shape=(16, 1, 8, 8), steps=2, text_tokens=4, text_dim=32,
                           cuda_graphs=True, repeats=3)
    assert row["first_call_seconds"] > 0 and row["seconds"] > 0 and row["tflops"] > 0
    assert len(row["timed_seconds"]) == 3 and row["seconds"] == sorted(row["timed_seconds"])[1]  # the median
    assert row["seconds_per_image"] == row["seconds"] / 2
    assert row["cuda_graphs"] is (row["device"] != "cpu") and row["compile"] is False
