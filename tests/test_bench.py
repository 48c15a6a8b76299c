"""The bench matrix (dfmkit.bench.matrix) on the CPU: a row's figures, and the memory a case hands back."""

from __future__ import annotations

import gc
import math

from dfmkit.bench.matrix import Layout, run_case
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
