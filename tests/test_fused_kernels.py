"""The DiT's Triton kernels (dfmkit.kernels.adaln, .qkv) against the torch code they replace: outputs and
every input gradient, on packs whose samples straddle kernel programs, start mid-sample (a sequence-parallel
share) or have no tokens; and the whole model with the kernels on against off, eager and compiled.

On CUDA the kernels run compiled. Without a GPU the kernel checks run in Triton's interpreter on the CPU when
Triton is installed (a CPU-only torch comes without it), in a subprocess because the interpreter is chosen
when the kernels are defined.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dit_harness as H
from triton_interpreter import needs_triton, run_interpreted
from dfmkit.components.backbones import dit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _relative_errors(got: dict, want: dict) -> dict:
    return {k: float((got[k].float() - want[k]).abs().max() / want[k].abs().max()) for k in want}


def check_adaln(device: str, dtype: torch.dtype, tolerance: float) -> None:
    from dfmkit import kernels

    g = torch.Generator().manual_seed(0)
    # 40 and 70 tokens span several 32-token backward programs; 0 tokens: a sample absent from this share
    for lengths, width, residual in [([5, 40, 1, 0, 30], 72, True), ([33, 31, 70], 40, False), ([100], 48, True)]:
        n = len(lengths)
        ids = torch.repeat_interleave(torch.arange(n), torch.tensor(lengths))[3:].to(device)  # starts mid-sample
        tokens = ids.numel()
        mod = torch.randn(n, 9 * width, generator=g)  # per-sample vectors as rows of the adaLN output
        gate, shift, scale = mod[:, :width], mod[:, width : 2 * width], mod[:, 5 * width : 6 * width]
        x, h = 2 * torch.randn(tokens, 1, width, generator=g) + 0.5, torch.randn(tokens, 1, width, generator=g)
        grad_x_new, grad_m = torch.randn(tokens, 1, width, generator=g), torch.randn(tokens, 1, width, generator=g)
        names = ["x", "h", "gate", "shift", "scale"] if residual else ["x", "shift", "scale"]
        inputs = dict(x=x, h=h, gate=gate, shift=shift, scale=scale)

        ref = {k: inputs[k].to(device).requires_grad_() for k in names}
        x_new = ref["x"] + ref["gate"][ids].unsqueeze(1) * ref["h"] if residual else ref["x"]
        m = F.layer_norm(x_new, (width,), eps=1e-6) * (1 + ref["scale"][ids].unsqueeze(1)) + ref["shift"][ids].unsqueeze(1)
        ((m * grad_m.to(device)).sum() + residual * (x_new * grad_x_new.to(device)).sum()).backward()
        want = {"m": m.detach(), "x_new": x_new.detach(), **{"grad " + k: ref[k].grad for k in names}}

        # the per-sample vectors keep their adaLN output's row stride, as in the model: shift and scale are rows of
        # one output, the gate a row of another one of another width (the MLP gate of the layer before)
        mod_k = mod.to(device, dtype).requires_grad_()
        gate_k = torch.cat([mod[:, :width], mod[:, :width]], 1).to(device, dtype).requires_grad_()
        leaves = {"x": x.to(device, dtype).requires_grad_(), "h": h.to(device, dtype).requires_grad_()}
        per_sample = dict(gate=gate_k[:, :width], shift=mod_k[:, width : 2 * width], scale=mod_k[:, 5 * width : 6 * width])
        for t in per_sample.values():
            t.retain_grad()
        samples = dit.Segments(ids, n)
        if residual:
            x_new_k, m_k = kernels.adaln.residual_norm_modulate(leaves["x"], leaves["h"], per_sample["gate"],
                                                                per_sample["shift"], per_sample["scale"], samples, 1e-6)
            ((m_k.float() * grad_m.to(device)).sum() + (x_new_k.float() * grad_x_new.to(device)).sum()).backward()
        else:
            x_new_k = leaves["x"]
            m_k = kernels.adaln.norm_modulate(leaves["x"], per_sample["shift"], per_sample["scale"], samples, 1e-6)
            (m_k.float() * grad_m.to(device)).sum().backward()
        got = {"m": m_k, "x_new": x_new_k, **{"grad " + k: (leaves.get(k) if k in leaves else per_sample[k]).grad
                                              for k in names}}
        errors = _relative_errors(got, want)
        assert max(errors.values()) <= tolerance, (lengths, residual, errors)


def check_adaln_partial_residual(device: str, dtype: torch.dtype, tolerance: float) -> None:
    """Without autograd the residual may cover the first rows only (the tokens of a guided pack's samples with
    text, after cross-attention): the rows after it come out as with a residual of zeros, x_new = x exactly."""
    from dfmkit import kernels

    g = torch.Generator().manual_seed(2)
    lengths, width = [40, 40, 40, 40], 72
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths)).to(device)
    mod = torch.randn(4, 3 * width, generator=g).to(device, dtype)
    gate, shift, scale = mod.chunk(3, dim=1)
    x = (2 * torch.randn(160, 1, width, generator=g) + 0.5).to(device, dtype)
    h = torch.randn(160, 1, width, generator=g).to(device, dtype)
    samples = dit.Segments(ids, 4)
    for rows in (80, 77, 0):
        whole = torch.cat([h[:rows], torch.zeros_like(h[rows:])])
        with torch.no_grad():
            x_new, m = kernels.adaln.residual_norm_modulate(x, h[:rows], gate, shift, scale, samples, 1e-6)
            want_x, want_m = kernels.adaln.residual_norm_modulate(x, whole, gate, shift, scale, samples, 1e-6)
        assert torch.equal(x_new, want_x) and torch.equal(m, want_m), rows
        assert torch.equal(x_new[rows:], x[rows:])
        x_ref = x.float() + gate.float()[ids].unsqueeze(1) * whole.float()
        m_ref = F.layer_norm(x_ref, (width,), eps=1e-6) * (1 + scale.float()[ids].unsqueeze(1)) \
            + shift.float()[ids].unsqueeze(1)
        errors = _relative_errors({"x_new": x_new, "m": m}, {"x_new": x_ref, "m": m_ref})
        assert max(errors.values()) <= tolerance, (rows, errors)


def check_qkv(device: str, dtype: torch.dtype, tolerance: float) -> None:
    from dfmkit import kernels

    g = torch.Generator().manual_seed(0)
    for tokens, heads, head_dim, rope in [(37, 3, 72, True), (50, 2, 16, False), (300, 4, 24, True)]:
        qkv = 3 * torch.randn(tokens, 1, heads * 3 * head_dim, generator=g)
        weights = [1 + 0.3 * torch.randn(head_dim, generator=g) for _ in range(2)]
        pos = torch.randint(0, 16, (tokens, 3), generator=g)
        grads = [torch.randn(tokens, heads, head_dim, generator=g).to(device) for _ in range(3)]

        leaves = [t.to(device).requires_grad_() for t in (qkv, *weights)]
        cos_sin = dit.rope3d(pos.to(device), head_dim, 10000.0) if rope else None
        q, k, v = leaves[0].view(tokens, heads, 3 * head_dim).split(head_dim, -1)
        q, k = F.rms_norm(q, (head_dim,), leaves[1], 1e-6), F.rms_norm(k, (head_dim,), leaves[2], 1e-6)
        if rope:
            q, k = dit.apply_rope(q, *cos_sin), dit.apply_rope(k, *cos_sin)
        sum((t * grad).sum() for t, grad in zip((q, k, v), grads)).backward()
        want = {"q": q.detach(), "k": k.detach(), "v": v.detach(), "grad qkv": leaves[0].grad,
                "grad q weight": leaves[1].grad, "grad k weight": leaves[2].grad}

        kernel_leaves = [t.to(device, dtype).requires_grad_() for t in (qkv, *weights)]
        rope_k = tuple(t.to(dtype) for t in cos_sin) if rope else None
        q_k, k_k, v_k = kernels.qkv.split_qkv(kernel_leaves[0], heads, kernel_leaves[1], kernel_leaves[2], 1e-6, rope_k)
        assert all(t.is_contiguous() and t.shape == (tokens, heads, head_dim) for t in (q_k, k_k, v_k))
        sum((t.float() * grad).sum() for t, grad in zip((q_k, k_k, v_k), grads)).backward()
        got = {"q": q_k, "k": k_k, "v": v_k, "grad qkv": kernel_leaves[0].grad,
               "grad q weight": kernel_leaves[1].grad, "grad k weight": kernel_leaves[2].grad}
        errors = _relative_errors(got, want)
        assert max(errors.values()) <= tolerance, (tokens, heads, head_dim, rope, errors)


def check_cross(device: str, dtype: torch.dtype, tolerance: float) -> None:
    """Cross-attention's pieces: the per-head query norm, and the text projection into normed keys and values."""
    from dfmkit import kernels

    g = torch.Generator().manual_seed(1)
    for tokens, heads, head_dim, copied in [(37, 3, 72, False), (21, 2, 16, True), (300, 4, 24, True)]:
        parts = 2 if copied else 1
        src = 3 * torch.randn(tokens, 1, heads * parts * head_dim, generator=g)
        weight = 1 + 0.3 * torch.randn(head_dim, generator=g)
        grads = [torch.randn(tokens, heads, head_dim, generator=g).to(device) for _ in range(parts)]

        leaves = [t.to(device).requires_grad_() for t in (src, weight)]
        outs = leaves[0].view(tokens, heads, parts * head_dim).split(head_dim, -1)
        outs = (F.rms_norm(outs[0], (head_dim,), leaves[1], 1e-6), *outs[1:])
        sum((t * grad).sum() for t, grad in zip(outs, grads)).backward()
        want = {**{f"out {i}": t.detach() for i, t in enumerate(outs)}, "grad src": leaves[0].grad,
                "grad weight": leaves[1].grad}

        kernel_leaves = [t.to(device, dtype).requires_grad_() for t in (src, weight)]
        if copied:
            outs_k = kernels.qkv.split_kv(kernel_leaves[0], heads, kernel_leaves[1], 1e-6)
        else:
            outs_k = (kernels.qkv.norm_heads(kernel_leaves[0], heads, kernel_leaves[1], 1e-6),)
        assert all(t.is_contiguous() and t.shape == (tokens, heads, head_dim) for t in outs_k)
        sum((t.float() * grad).sum() for t, grad in zip(outs_k, grads)).backward()
        got = {**{f"out {i}": t for i, t in enumerate(outs_k)}, "grad src": kernel_leaves[0].grad,
               "grad weight": kernel_leaves[1].grad}
        errors = _relative_errors(got, want)
        assert max(errors.values()) <= tolerance, (tokens, heads, head_dim, copied, errors)


# --------------------------------------------------------------------------------------------
# The kernels
# --------------------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("check", [check_adaln, check_adaln_partial_residual, check_qkv, check_cross])
def test_cuda_kernels_match_torch(check):
    check("cuda", torch.bfloat16, 2e-2)


@needs_triton
@pytest.mark.parametrize("check", ["check_adaln", "check_adaln_partial_residual", "check_qkv", "check_cross"])
def test_kernels_match_torch_in_tritons_interpreter(check):
    """The kernels' indexing and per-sample bookkeeping in fp32, to the torch code's rounding."""
    run_interpreted("test_fused_kernels", check)


# --------------------------------------------------------------------------------------------
# In the model
# --------------------------------------------------------------------------------------------


def _model_run(options, cpu_batch, dtype):
    model = dit.build(options)
    H.randomize_(model)
    model.to(dtype)
    x, c_noise, _ = (t.cuda() for t in H.pack_inputs(cpu_batch, 0))
    out = model(x, c_noise, cpu_batch.to("cuda", dtype))
    out.float().square().mean().backward()
    return out.float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


@cuda
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("equal_sizes", [False, True])
def test_cuda_model_with_fused_kernels_matches_fp32_torch_code(equal_sizes, compiled, monkeypatch):
    """bf16 with the kernels lands as close to the fp32 torch code as bf16 without them, and they do run."""
    from dfmkit.batch import pack
    from dfmkit import kernels

    calls = []
    for module, name in [(kernels.adaln, "residual_norm_modulate"), (kernels.qkv, "split_qkv"),
                         (kernels.qkv, "norm_heads"), (kernels.qkv, "split_kv")]:
        def spy(*args, _original=getattr(module, name), _name=name):
            calls.append(_name)
            return _original(*args)
        monkeypatch.setattr(module, name, spy)
    cpu_batch = (pack(H.make_samples(5, [(1, 4, 4)] * 3, [6, 6, 6]), 2, 1, pad_multiple=8) if equal_sizes
                 else H.make_packs()[0])
    options = dict(use_cpu_initialization=True, compile=compiled)
    torch._dynamo.reset()
    want_out, want_grad = _model_run(H.tiny_options(fused_kernels=False, **options), cpu_batch, torch.float32)
    plain_out, plain_grad = _model_run(H.tiny_options(fused_kernels=False, **options), cpu_batch, torch.bfloat16)
    assert not calls
    fused_out, fused_grad = _model_run(H.tiny_options(fused_kernels=True, **options), cpu_batch, torch.bfloat16)
    assert {"residual_norm_modulate", "split_qkv", "norm_heads", "split_kv"} <= set(calls)

    def error(got, want, norm):
        return float((got - want).norm() / want.norm()) if norm else float((got - want).abs().max() / want.abs().max())

    for norm, got, plain, want in [(False, fused_out, plain_out, want_out), (True, fused_grad, plain_grad, want_grad)]:
        assert error(got, want, norm) <= max(3e-2, 1.5 * error(plain, want, norm)), (error(got, want, norm), error(plain, want, norm))


@cuda
def test_gelu_in_the_mlp_matmul_is_closer_to_exact_gelu_than_the_unfused_bf16_path():
    """Sampling's fc1 + GELU in one cuBLASLt call (tanh GELU on the fp32 accumulator) against training's path (fc1
    rounded to bf16, then exact GELU), both measured from the exact GELU of the exact product; and the DiT's MLP
    takes the fused path without autograd only."""
    from dfmkit.components.backbones.dit.block import DiTMLP

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1152, generator=g).cuda().bfloat16()
    w = (torch.randn(4608, 1152, generator=g) / 1152 ** 0.5 * 2).cuda().bfloat16()
    exact = F.gelu(x.double() @ w.double().t())
    fused = torch._addmm_activation(torch.zeros(4608, device="cuda", dtype=torch.bfloat16), x, w.t(), use_gelu=True)
    unfused = F.gelu(x @ w.t())
    error = {name: (t.double() - exact).abs() for name, t in (("fused", fused), ("unfused", unfused))}
    assert error["fused"].mean() < error["unfused"].mean(), {k: float(v.mean()) for k, v in error.items()}
    assert error["fused"].max() <= error["unfused"].max(), {k: float(v.max()) for k, v in error.items()}

    model = dit.build(H.tiny_options()).cuda().bfloat16()
    mlp = model.decoder.layers[0].mlp
    assert isinstance(mlp, DiTMLP)
    h = torch.randn(64, 1, mlp.linear_fc1.weight.shape[1], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out_fused = mlp(h)[0]
    out_unfused = mlp(h)[0].detach()  # autograd on: megatron's MLP as in training
    assert not torch.equal(out_fused, out_unfused)
    torch.testing.assert_close(out_fused, out_unfused, rtol=0.05, atol=0.05)
