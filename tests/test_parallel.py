"""Every parallel layout gives the single-process model's loss, gradients and outputs (CPU, gloo, fp32).

Workers are forked from a forkserver that has torch and megatron imported already (imports are most of
the cost of a process), run every layout of their world size in turn, and save loss, full gradients
(TP shards concatenated, CP/DP/TP reductions done) and the gathered output. The reference is the same
tiny model (weights set from parameter names, see dit_harness.randomize_) run in this process.
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

LAYOUTS = {
    # name: (world size, parallel sizes, packs compared (= data-parallel size), model option overrides)
    "tp2": (2, dict(tensor=2, sequence=False, context=1), 1, {}),
    "tp2_sp": (2, dict(tensor=2, sequence=True, context=1), 1, {}),
    "cp2": (2, dict(tensor=1, sequence=False, context=2), 1, {}),
    "dp2": (2, dict(tensor=1, sequence=False, context=1), 2, {}),
    "tp2_sp_sincos_full_adaln": (2, dict(tensor=2, sequence=True, context=1), 1,
                                 dict(position_embedding="sincos3d", adaln_lora_rank=0)),
    "cp2_recompute": (2, dict(tensor=1, sequence=False, context=2), 1, dict(recompute="full")),
    "tp2_cp2": (4, dict(tensor=2, sequence=False, context=2), 1, {}),
    "tp2_sp_cp2_ddp": (4, dict(tensor=2, sequence=True, context=2, ddp=True), 1, {}),
    "dp2_ddp_overlap": (2, dict(tensor=1, sequence=False, context=1, ddp=True, overlap=True), 2, {}),
}

RTOL = 1e-5  # of each tensor's largest magnitude; fp32 reordering of sums gives about 5e-7


def _spawn(world: int, outdir: str) -> None:
    layouts = [(name, parallel, overrides) for name, (w, parallel, _, overrides) in LAYOUTS.items() if w == world]
    multiprocessing.set_forkserver_preload(["dit_harness", "dfmkit.components.backbones.dit"])
    mp.start_processes(H.worker, args=(world, H.free_port(), outdir, layouts), nprocs=world, start_method="forkserver")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("parallel")
    for world in sorted({w for w, _, _, _ in LAYOUTS.values()}):
        _spawn(world, str(outdir))
    return outdir


@pytest.fixture(scope="module")
def references():
    packs = H.make_packs()
    refs = {}
    for _, _, dp, overrides in LAYOUTS.values():
        key = (dp, tuple(sorted(overrides.items())))
        if key not in refs:
            refs[key] = H.reference(H.tiny_options(**overrides), packs[:dp])
    return refs


def _close(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(results, references, name):
    world, parallel, dp, overrides = LAYOUTS[name]
    ref = references[(dp, tuple(sorted(overrides.items())))]
    got = torch.load(results / f"{name}.pt")
    assert _close(got["loss"], ref["loss"]) < RTOL, (got["loss"], ref["loss"])
    assert set(got["grads"]) == set(ref["grads"])
    worst = {n: _close(got["grads"][n], g) for n, g in ref["grads"].items()}
    bad = {n: e for n, e in worst.items() if not e < RTOL}
    assert not bad, f"{name}: gradients differ from the single-process model: {bad}"
    for rank in range(dp):
        out = torch.load(results / f"{name}-out{rank}.pt")
        assert _close(out, ref["outputs"][rank]) < RTOL


def test_overlapped_reduction_starts_with_every_gradient_added(results):
    """With overlapped reduction (megatron starts a bucket's reduction in the backward from the second pass on)
    some layer's parameters straddle two buckets, and no bucket starts its reduction while the batched
    accumulation still keeps a gradient of one of its parameters (without the add before each start, 26 were kept
    and the layout's gradients above were wrong)."""
    saved = torch.load(results / "dp2_ddp_overlap.pt")
    assert saved["split_groups"] > 0
    assert saved["reductions"]["started"] > 1 and saved["reductions"]["kept"] == 0, saved["reductions"]


def test_gradients_are_not_trivial(references):
    """The comparison means something: every parameter gets a gradient of a sensible size."""
    for name, grad in references[(1, ())]["grads"].items():
        assert grad.abs().max() > 1e-6, name


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
    assert torch.equal(sum(s.local_seqlens() for s in shards), batch.seqlens.to(torch.int64))


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
