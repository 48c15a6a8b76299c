"""Sampling launches work without waiting for the device: once a pack is set up, an evaluation of the guided DiT and
the sampler's loop read no value back from the device and copy nothing from the host, so the host can run ahead
of a GPU (and a CUDA graph can capture an evaluation). Checked on the CPU by recording the operations that would do
so on a GPU (:class:`HostReads`); the values a pack derives once (token ids and mask, the DiT's layout) are checked
against a fresh computation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dit_harness as H
from dfmkit.components.backbones import dit
from dfmkit.components.objectives.edm import EDM
from dfmkit.components.objectives.rectified_flow import RectifiedFlow
from dfmkit.components.samplers import make_sampler
from dfmkit.diffusion import guided_denoiser
from dfmkit.diffusion.objective import as_model_fn
from dfmkit.generation.sampling import sample_latents
from dfmkit.parallel import split_for_context_parallel

aten = torch.ops.aten


class HostReads(TorchDispatchMode):
    """Records the operations that make the host wait for a GPU or copy host data to it: reading a value
    (``item()``, ``bool()``, ``float()``, Python comparisons: ``_local_scalar_dense``; ``tolist()``, which bypasses
    the dispatcher, through a patch), results whose size depends on values (``nonzero``, boolean indexing,
    ``repeat_interleave`` without ``output_size``), and tensors made from Python data (``torch.tensor(list)``)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.events: list[str] = []
        tolist = torch.Tensor.tolist

        def recorded_tolist(tensor):
            self.events.append("tolist")
            return tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", recorded_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._local_scalar_dense.default, aten.lift_fresh.default, aten.nonzero.default,
                    aten.masked_select.default, aten._pin_memory.default):
            self.events.append(str(func))
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.events.append(str(func))
        elif func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.events.append("boolean indexing")
        return func(*args, **kwargs)


def analytic_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x / (1 + sigma**2)


@pytest.mark.parametrize("objective", [EDM(), RectifiedFlow()], ids=["edm", "rectified-flow"])
@pytest.mark.parametrize("sampler", ["heun", "euler"])
def test_the_deterministic_sampler_loop_reads_nothing_back(monkeypatch, objective, sampler):
    noise = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    with HostReads(monkeypatch) as reads:
        make_sampler(sampler, num_steps=5).sample(analytic_denoiser, noise, objective)
    assert reads.events == []


def test_churn_reads_the_level_back_so_the_detector_sees_reads(monkeypatch):
    """Stochastic sampling compares the level on the device with its range on the host at every step (accepted
    there); that the recorder sees it shows the test above can fail."""
    noise = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    sampler = make_sampler("heun", num_steps=5, s_churn=10.0, s_min=0.05, s_max=50.0)
    with HostReads(monkeypatch) as reads:
        sampler.sample(analytic_denoiser, noise, EDM(), generator=torch.Generator().manual_seed(1))
    assert "aten._local_scalar_dense.default" in reads.events


@pytest.fixture(scope="module")
def tiny_dit():
    return H.sampling_model("cpu")


def counting_layouts(monkeypatch) -> list[int]:
    calls = []
    build = dit.build_layout
    monkeypatch.setattr(dit.model, "build_layout", lambda *a, **k: (calls.append(1), build(*a, **k))[1])
    return calls


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_the_guided_dit_lays_the_pack_out_once_and_reads_nothing_back(monkeypatch, tiny_dit, guidance):
    """A sampling run of the guided DiT on a pack of mixed sizes: after the first evaluation (which lays the pack
    out) nothing is read back or copied from the host, and the layout is built once for all evaluations."""
    batch = H.make_packs()[0]
    layouts = counting_layouts(monkeypatch)
    denoise = guided_denoiser(as_model_fn(tiny_dit, torch.device("cpu"), torch.float32), EDM(), batch, guidance)
    x = torch.randn(batch.latents.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = denoise(x, torch.tensor(2.0, dtype=torch.float64))
        with HostReads(monkeypatch) as reads:
            make_sampler("heun", num_steps=3).sample(denoise, x, EDM())
    assert reads.events == []
    assert len(layouts) == 1
    # The layout kept on the pack gives the numbers of a fresh one, bit for bit.
    with torch.no_grad():
        again = denoise(x, torch.tensor(2.0, dtype=torch.float64))
        fresh = guided_denoiser(as_model_fn(tiny_dit, torch.device("cpu"), torch.float32), EDM(),
                                dataclasses.replace(batch), guidance)(x, torch.tensor(2.0, dtype=torch.float64))
    assert len(layouts) == 2
    assert torch.equal(first, again) and torch.equal(first, fresh)


def test_the_dit_builds_the_layout_again_for_another_pack_or_changed_fields(monkeypatch, tiny_dit):
    batch = H.make_packs()[0]
    layouts = counting_layouts(monkeypatch)
    x, c_noise, _ = H.pack_inputs(batch, 0)
    with torch.no_grad():
        out = tiny_dit(x, c_noise, batch)
        assert torch.equal(tiny_dit(x, c_noise, batch), out) and len(layouts) == 1
        tiny_dit(x, c_noise, dataclasses.replace(batch))  # another pack object
        assert len(layouts) == 2
        batch.pos_ids = batch.pos_ids.flip(0)  # another field: other rotary angles
        moved = tiny_dit(x, c_noise, batch)
        assert len(layouts) == 3 and not torch.equal(moved, out)
        batch.pos_ids.mul_(1)  # changed in place
        tiny_dit(x, c_noise, batch)
        assert len(layouts) == 4


def fresh_ids_and_mask(batch):
    copy = dataclasses.replace(batch)
    return copy._token_sample_ids(), copy._token_mask()


def test_token_ids_and_mask_are_computed_once_per_pack_and_again_when_a_field_changes():
    batch = H.make_packs()[0]
    ids, mask = batch.token_sample_ids(), batch.token_mask()
    assert batch.token_sample_ids() is ids and batch.token_mask() is mask
    want_ids, want_mask = fresh_ids_and_mask(batch)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    assert batch.with_text(batch.text + 1).token_mask() is mask  # text is not part of the token layout

    batch.seqlens = batch.seqlens - 1  # a field replaced
    assert not torch.equal(batch.token_mask(), mask)
    assert torch.equal(batch.token_mask(), fresh_ids_and_mask(batch)[1])

    batch.seqlens[0] -= 1  # changed in place
    assert torch.equal(batch.token_mask(), fresh_ids_and_mask(batch)[1])

    batch.latents = torch.cat([batch.latents, batch.latents[:8]])  # more tokens: the last sample gets them
    batch.cu_seqlens = torch.cat([batch.cu_seqlens[:-1], batch.cu_seqlens[-1:] + 8])
    assert batch.token_sample_ids().shape == (batch.num_tokens,)
    assert torch.equal(batch.token_sample_ids(), fresh_ids_and_mask(batch)[0])

    returned = batch.token_mask()
    returned[0] = ~returned[0]  # a user changing it in place gets it computed again
    assert torch.equal(batch.token_mask(), fresh_ids_and_mask(batch)[1])


def test_a_context_parallel_shard_keeps_its_own_mask():
    batch = H.make_packs()[0]
    for rank in range(2):
        shard = split_for_context_parallel(batch, 2, rank)
        mask = shard.token_mask()
        assert shard.token_mask() is mask
        assert torch.equal(mask, fresh_ids_and_mask(shard)[1])
        shard.global_cu_seqlens = shard.global_cu_seqlens.clone()  # a field only a shard's mask reads
        again = shard.token_mask()
        assert again is not mask and torch.equal(again, mask)


@pytest.mark.parametrize("cp", [1, 2])
def test_the_doubled_pack_knows_its_lengths_without_reading_them_back(monkeypatch, cp):
    batch = H.make_packs()[0]
    batch = split_for_context_parallel(batch, cp, 1) if cp > 1 else batch
    batch = batch.to("cpu")  # as sampling moves a pack to its device: the host copies of its lengths come along
    with HostReads(monkeypatch) as reads:
        doubled = batch.with_unconditional()
        doubled.validate()
    assert reads.events == []
    for name in type(doubled).HOST_FIELDS:
        assert doubled.host(name) == torch.Tensor.tolist(getattr(doubled, name)), name


def test_sampling_hands_the_network_the_same_pack_in_its_dtype_at_every_evaluation():
    """The pack is moved and converted once per sampling call, not at every evaluation, so the network sees one
    object (and lays it out once)."""
    seen = []

    def network(x, c_noise, batch):
        seen.append((batch, batch.text.dtype, x.dtype))
        return torch.zeros_like(x)

    texts = [torch.randn(3, 8), torch.randn(5, 8)]
    sample_latents(as_model_fn(network, torch.device("cpu"), torch.bfloat16), EDM(condition_dropout=0.2),
                   make_sampler("heun", num_steps=3), texts, [(4, 1, 4, 4), (4, 1, 2, 4)], guidance=3.0, seed=0,
                   patch_spatial=2, patch_temporal=1, model_dtype=torch.bfloat16)
    assert len(seen) == 5  # 2 N - 1 evaluations, both guidance rows in one
    assert all(batch is seen[0][0] for batch, _, _ in seen)
    assert all(text == torch.bfloat16 and x == torch.bfloat16 for _, text, x in seen)
