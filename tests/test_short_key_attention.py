"""The short-key attention kernels (dfmkit.kernels.short_keys) against per-segment SDPA in fp32:
output and the q, k, v gradients, on packs with segments of mixed lengths (query tiles straddling segment
ends, segments without queries, one key, the full 128), q/k/v as strided views of one projection, and each
key tile size. On CUDA in bf16 (and through the default ``torch`` backend, eager and compiled); without a GPU
in Triton's interpreter in fp32, when Triton is installed.
"""

from __future__ import annotations

import pytest
import torch

from triton_interpreter import needs_triton, run_interpreted
from dfmkit.components.attention.base import VarlenParams
from dfmkit.components.attention.torch_backend import sdpa_segments

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [  # (query lengths, key lengths, heads, head dim)
    ([5, 130, 0, 64, 1, 200], [3, 77, 2, 128, 1, 50], 3, 72),  # 128-key tiles; a segment with keys but no queries
    ([40, 17, 33], [10, 16, 1], 2, 64),  # 16-key tiles
    ([70, 3], [33, 20], 2, 40),  # 64-key tiles, a head dim that is not a power of two
    ([9], [32], 1, 16),
]


def _views(tokens: int, heads: int, head_dim: int, generator, device, dtype, parts: int):
    """``parts`` tensors ``[tokens, heads, head_dim]``, strided views of one ``[tokens, heads, parts * head_dim]``."""
    whole = torch.randn(tokens, heads, parts * head_dim, generator=generator).to(device, dtype).requires_grad_()
    return whole, whole.split(head_dim, dim=-1)


def check_short_keys(device: str, dtype: torch.dtype, tolerance: float) -> None:
    from dfmkit.kernels import short_keys

    g = torch.Generator().manual_seed(0)
    for lengths_q, lengths_k, heads, head_dim in CASES:
        cu_q = [0, *torch.tensor(lengths_q).cumsum(0).tolist()]
        cu_k = [0, *torch.tensor(lengths_k).cumsum(0).tolist()]
        params = VarlenParams.from_host(cu_q, cu_k, device)
        q_whole, (q,) = _views(cu_q[-1], heads, head_dim, g, device, dtype, 1)
        kv_whole, (k, v) = _views(cu_k[-1], heads, head_dim, g, device, dtype, 2)
        grad = torch.randn(cu_q[-1], heads, head_dim, generator=g).to(device, dtype)

        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        want_out = sdpa_segments(*leaves, params)
        want_out.backward(grad.double())
        out = short_keys.attention(q, k, v, params)
        out.backward(grad)
        assert out.is_contiguous() and out.shape == q.shape
        got = [out, q_whole.grad, *kv_whole.grad.split(head_dim, -1)]
        want = [want_out, leaves[0].grad, leaves[1].grad, leaves[2].grad]
        for name, a, b in zip(["out", "grad q", "grad k", "grad v"], got, want):
            error = float((a.detach().double() - b).abs().max() / b.abs().max())
            assert error <= tolerance, (lengths_q, lengths_k, name, error, dict(short_keys.LAUNCH))
        empty = cu_k[lengths_q.index(0)] if 0 in lengths_q else None
        if empty is not None:  # keys nobody attends to get zero gradients, not leftovers of an empty tensor
            assert kv_whole.grad[empty].abs().max() == 0


@cuda
def test_cuda_short_key_attention_matches_sdpa():
    check_short_keys("cuda", torch.bfloat16, 2e-2)


@needs_triton
def test_short_key_attention_in_tritons_interpreter():
    """The kernels' indexing and masking in fp32, to float rounding."""
    run_interpreted("test_short_key_attention", "check_short_keys")


@cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_default_backend_picks_the_kernels_where_they_are_faster(compiled, monkeypatch):
    """The ``torch`` backend runs segments of at most 64 keys, and unequal ones of at most 128, through the kernels
    (also compiled), equal segments of 65-128 keys and anything longer through cuDNN or flash varlen; either way its
    result and gradients agree with cuDNN's or flash varlen's."""
    from dfmkit.components.attention import torch_backend
    from dfmkit.kernels import short_keys

    calls = []
    original = short_keys.attention
    monkeypatch.setattr(short_keys, "attention", lambda *a: calls.append(1) or original(*a))
    backend = torch_backend.build_auto(None)
    run = torch.compile(backend) if compiled else backend
    g = torch.Generator().manual_seed(1)
    for keys, expect_kernel in [([10] * 8, True), ([77] * 8, False), ([77, 60] * 4, True), ([200] * 8, False)]:
        calls.clear()
        cu_k = [0, *torch.tensor(keys).cumsum(0).tolist()]
        params = VarlenParams.from_host(list(range(0, 8 * 256 + 1, 256)), cu_k, "cuda")
        q, k, v = (torch.randn(n, 16, 72, generator=g).cuda().bfloat16().requires_grad_()
                   for n in (8 * 256, cu_k[-1], cu_k[-1]))
        out = run(q, k, v, params)
        out.float().square().sum().backward()
        got = [out, q.grad, k.grad, v.grad]
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        ref = torch_backend.cudnn_or_varlen(*leaves, params)
        ref.float().square().sum().backward()
        for a, b in zip(got, [ref, *(t.grad for t in leaves)]):
            assert float((a.float() - b.float()).abs().max() / b.float().abs().max()) < 2e-2
        assert bool(calls) == expect_kernel, keys
