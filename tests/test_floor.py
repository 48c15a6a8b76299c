"""The step floor's arithmetic (dfmkit.bench.floor): its matrix products are the model's, its byte count the table's."""

from __future__ import annotations

import pytest

from dfmkit.bench.flops import DiTShape, forward_breakdown
from dfmkit.bench.floor import OPTIMIZER_BYTES_PER_PARAMETER, bandwidth_bytes, linears, optimizer_bytes


@pytest.mark.parametrize("preset,lengths,texts", [("XL", [256] * 4, [77] * 4), ("S", [64, 256, 1024], [3, 10, 77])])
@pytest.mark.parametrize("rank", [0, 256])
def test_forward_products_are_the_flop_counters_less_attention_cores(preset, lengths, texts, rank):
    shape = DiTShape.preset(preset, adaln_lora_rank=rank)
    forward = sum(2 * m * k * n * linear.count for linear in linears(shape, lengths, texts)
                  for kind, m, k, n in linear.products() if kind == "forward")
    counted = forward_breakdown(shape, lengths, texts)
    assert forward == sum(counted.values()) - counted["self_attn_core"] - counted["cross_attn_core"]


def test_backward_products_skip_only_the_gradients_nothing_needs():
    shape = DiTShape.preset("XL")
    by_name = {linear.name: linear for linear in linears(shape, [256] * 2, [77] * 2)}
    without_input_gradient = {name for name, linear in by_name.items() if not linear.input_gradient}
    assert without_input_gradient == {"cross-attention kv", "patch embedding", "timestep MLP in"}
    for linear in by_name.values():
        kinds = [kind for kind, *_ in linear.products()]
        assert kinds.count("weight gradient") == 1 and kinds.count("forward") == 1
    fc2 = by_name["MLP fc2"].products()
    assert fc2 == [("forward", 512, 4608, 1152), ("input gradient", 512, 1152, 4608), ("weight gradient", 1152, 512, 4608)]
    assert by_name["MLP fc2"].count == 28 and by_name["final linear"].count == 1


def test_bytes_of_dit_xl_at_128_x_256_tokens_by_hand():
    shape = DiTShape.preset("XL")
    e, e_text = 32768 * 1152 * 2, 128 * 77 * 1152 * 2
    moved = bandwidth_bytes(shape, 32768, 128 * 77)
    # per layer: three adaLN chains (4 E forward, 6 E backward), q/k/v split 6 + 8, cross q norm 2 + 3, text kv 4 + 5,
    # GELU 2 x 4 + 3 x 4; once: the final layer's norm 2 + 3
    assert moved["adaLN chains (norms, modulation, gated residuals)"] == 28 * 30 * e + 5 * e
    assert moved["q/k norms, RoPE, head split"] == 28 * (19 * e + 9 * e_text)
    assert moved["GELU"] == 28 * 20 * e
    assert sum(moved.values()) == 28 * (69 * e + 9 * e_text) + 5 * e
    assert optimizer_bytes(673_297_984) == 673_297_984 * OPTIMIZER_BYTES_PER_PARAMETER == 673_297_984 * 44
