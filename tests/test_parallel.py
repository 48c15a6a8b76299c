"""Every parallel layout gives the single-process run's loss, gradients and outputs (CPU, gloo, fp32), through the
Trainer's own code: its state (megatron DDP with the batched accumulation), its step's gradients (the noise draw, the
load-balanced context-parallel shard, the objective's loss (EDM, and rectified flow), finalize_model_grads) and the optimizer's division by the global
count (dit_harness.trainer_step).

Workers are forked from a forkserver that has torch and megatron imported already (imports are most of
the cost of a process), run every layout of their world size in turn, and save loss, full gradients
(TP shards concatenated) and the gathered output. The reference is the same step of the same tiny model (weights
set from parameter names, see dit_harness.randomize_) in this process, on the whole global batch.
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.multiprocessing as mp

import dit_harness as H
from dfmkit.batch import BatchError
from dfmkit.parallel import required_pad_multiple, split_for_context_parallel
from dfmkit.parallel.context import ContextParallelBatch, shard_index
from dfmkit.recipe import ParallelConfig

TOKEN = {"loss_normalization": "token"}
FLOW = {"name": "rectified-flow", "shift_by_tokens": True}  # each sample's shift reads its own token count
LAYOUTS = {
    # name: (world size, parallel sizes, packs (= data-parallel size), model options, diffusion options, overlap)
    "tp2": (2, dict(tensor=2), 1, {}, {}, False),
    "tp2_sp": (2, dict(tensor=2, sequence=True), 1, {}, {}, False),
    "cp2": (2, dict(context=2), 1, {}, {}, False),
    "dp2": (2, dict(), 2, {}, {}, False),
    "tp2_sp_sincos_full_adaln": (2, dict(tensor=2, sequence=True), 1,
                                 dict(position_embedding="sincos3d", adaln_lora_rank=0), {}, False),
    "cp2_recompute": (2, dict(context=2), 1, dict(recompute="full"), {}, False),
    "dp2_overlap": (2, dict(), 2, {}, {}, True),
    "tp2_cp2": (4, dict(tensor=2, context=2), 1, {}, {}, False),
    "tp2_sp_cp2_token": (4, dict(tensor=2, sequence=True, context=2), 1, {}, TOKEN, False),
    "dp2_cp2_token": (4, dict(context=2), 2, {}, TOKEN, False),
    "tp2_flow": (2, dict(tensor=2), 1, {}, FLOW, False),
    "tp2_sp_flow": (2, dict(tensor=2, sequence=True), 1, {}, FLOW, False),
    "cp2_flow": (2, dict(context=2), 1, {}, FLOW, False),
    "tp2_sp_cp2_flow": (4, dict(tensor=2, sequence=True, context=2), 1, {}, FLOW, False),
}

RTOL = 1e-5  # of each tensor's largest magnitude; fp32 reordering of sums gives about 5e-7


def _recipe(name: str) -> dict:
    _, parallel, packs, model, diffusion, _ = LAYOUTS[name]
    return H.parity_recipe(parallel, model, diffusion, packs)


def _reference_key(name: str) -> tuple:
    _, _, packs, model, diffusion, _ = LAYOUTS[name]
    return packs, tuple(sorted(model.items())), tuple(sorted(diffusion.items()))


def _spawn(world: int, outdir: str) -> None:
    layouts = [(name, _recipe(name), spec[-1]) for name, spec in LAYOUTS.items() if spec[0] == world]
    multiprocessing.set_forkserver_preload(["dit_harness", "dfmkit.components.backbones.dit", "dfmkit.train.step"])
    mp.start_processes(H.worker, args=(world, H.free_port(), outdir, layouts), nprocs=world, start_method="forkserver")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("parallel")
    for world in sorted({spec[0] for spec in LAYOUTS.values()}):
        _spawn(world, str(outdir))
    return outdir


@pytest.fixture(scope="module")
def references():
    """The one-process step of each layout's model and global batch, in this process."""
    packs = H.make_packs()
    refs = {}
    for name in LAYOUTS:
        key = _reference_key(name)
        if key not in refs:
            _, _, dp, model, diffusion, _ = LAYOUTS[name]
            refs[key] = H.trainer_step(H.parity_recipe({}, model, diffusion, dp), packs)
    return refs


def _close(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(results, references, name):
    """On every rank: the loss, the count it divides by, the gradient norm and the gradients the optimizer reads."""
    world, _, dp, _, _, _ = LAYOUTS[name]
    ref = references[_reference_key(name)]
    for rank in range(world):
        got = torch.load(results / f"{name}-rank{rank}.pt")
        assert torch.equal(got["count"], ref["count"]), rank  # samples (or real tokens) of the global batch
        assert _close(got["loss"], ref["loss"]) < RTOL, (rank, got["loss"], ref["loss"])
        assert _close(got["grad_norm"], ref["grad_norm"]) < RTOL, (rank, got["grad_norm"], ref["grad_norm"])
        assert set(got["grads"]) == set(ref["grads"])
        worst = {n: _close(got["grads"][n], g) for n, g in ref["grads"].items()}
        bad = {n: e for n, e in worst.items() if not e < RTOL}
        assert not bad, f"{name}, rank {rank}: gradients differ from the single-process run: {bad}"
    for index in range(dp):
        out = torch.load(results / f"{name}-out{index}.pt")
        assert _close(out, ref["outputs"][index]) < RTOL


def test_overlapped_reduction_starts_with_every_gradient_added(results):
    """With overlapped reduction (megatron starts a bucket's reduction in the backward from the second pass on)
    some layer's parameters straddle two buckets, and no bucket starts its reduction while the batched
    accumulation still keeps a gradient of one of its parameters (without the add before each start, 26 were kept
    and the layout's gradients above were wrong)."""
    saved = torch.load(results / "dp2_overlap-rank0.pt")
    assert saved["split_groups"] > 0
    assert saved["reductions"]["started"] > 1 and saved["reductions"]["kept"] == 0, saved["reductions"]


def test_the_comparison_means_something(references):
    """Every parameter gets a gradient of a sensible size; the norm the optimizer clips by is the norm of exactly
    these gradients; "sample" and "token" normalisation give different losses of the same batch (its samples have
    different sizes)."""
    ref = references[(1, (), ())]
    for name, grad in ref["grads"].items():
        assert grad.abs().max() > 1e-6, name
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref["grads"].values()]))
    assert _close(ref["grad_norm"], norm) < RTOL
    token = references[(1, (), tuple(TOKEN.items()))]
    assert token["count"] > ref["count"] and _close(token["loss"], ref["loss"]) > 1e-3
    flow = references[(1, (), tuple(sorted(FLOW.items())))]
    assert torch.equal(flow["count"], ref["count"]) and _close(flow["loss"], ref["loss"]) > 1e-3


# --------------------------------------------------------------------------------------------
# The context-parallel split on its own (no processes needed)
# --------------------------------------------------------------------------------------------


def test_required_pad_multiple():
    assert required_pad_multiple(ParallelConfig()) == 1
    assert required_pad_multiple(ParallelConfig(tensor=2)) == 1
    assert required_pad_multiple(ParallelConfig(tensor=2, sequence=True)) == 2
    assert required_pad_multiple(ParallelConfig(context=2)) == 4
    assert required_pad_multiple(ParallelConfig(tensor=4, sequence=True, context=2)) == 16


def test_split_is_load_balanced_and_covers_every_token():
    batch = H.make_packs(pad_multiple=8)[0]
    cu = batch.cu_seqlens.tolist()
    shards = [split_for_context_parallel(batch, 2, r) for r in range(2)]
    index = [shard_index(cu, 2, r) for r in range(2)]
    assert sorted(torch.cat(index).tolist()) == list(range(batch.num_tokens))
    for r, shard in enumerate(shards):
        assert isinstance(shard, ContextParallelBatch)
        assert shard.num_tokens == batch.num_tokens // 2
        assert torch.equal(shard.latents, batch.latents[index[r]])
        assert torch.equal(shard.token_mask(), batch.token_mask()[index[r]])
        shard.validate()
    # Rank 0 holds chunks 0 and 3 of each sample, rank 1 chunks 1 and 2 (2 * CP = 4 chunks).
    first = cu[1] // 4
    assert index[0][: 2 * first].tolist() == [*range(0, first), *range(3 * first, 4 * first)]
    assert index[1][: 2 * first].tolist() == [*range(first, 2 * first), *range(2 * first, 3 * first)]
    # Real-token counts add up per sample across the ranks.
    real = [torch.bincount(s.token_sample_ids()[s.token_mask()], minlength=batch.num_samples) for s in shards]
    assert torch.equal(sum(real), batch.seqlens.to(torch.int64))


def test_split_rejects_lengths_that_do_not_divide():
    batch = H.make_packs(pad_multiple=2)[0]
    with pytest.raises(BatchError, match=r"multiple of 4 tokens.*padded sample lengths are \["):
        split_for_context_parallel(batch, 2, 0)


def test_unconditional_copy_of_a_shard_is_the_shard_of_the_unconditional_pack():
    from dfmkit.batch import with_unconditional

    batch = H.make_packs()[1]
    for rank in range(2):
        expected = split_for_context_parallel(with_unconditional(batch), 2, rank)
        got = split_for_context_parallel(batch, 2, rank).with_unconditional()
        for field in ("latents", "cu_seqlens", "seqlens", "text", "cu_seqlens_kv", "pos_ids", "global_cu_seqlens"):
            assert torch.equal(getattr(got, field), getattr(expected, field)), field
        assert got.null_text_from == expected.null_text_from == batch.num_samples
        assert torch.equal(got.token_mask(), expected.token_mask())


def test_shard_and_gather_without_context_parallelism_pass_through():
    from dfmkit.parallel import gather_from_context_parallel, shard_for_context_parallel

    batch = H.make_packs()[0]
    noise = torch.randn(batch.latents.shape)
    shard, local = shard_for_context_parallel(batch, noise, _Env(1, 0))
    assert shard is batch and local is noise
    assert gather_from_context_parallel(local, shard) is local
    cp_shard, cp_noise = shard_for_context_parallel(batch, noise, _Env(2, 1))
    assert torch.equal(cp_noise, noise[shard_index(batch.cu_seqlens.tolist(), 2, 1)])
    with pytest.raises(BatchError, match="needs the ContextParallelBatch"):
        gather_from_context_parallel(cp_noise, _Env(2, 1))


class _Env:
    def __init__(self, cp_size, cp_rank):
        self.cp_size, self.cp_rank = cp_size, cp_rank
