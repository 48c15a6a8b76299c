"""The training loader: bad shards never crash it, DP parts, savable state as JSON, mock data."""

from __future__ import annotations

import json
import logging
import signal
import tarfile

import numpy as np
import pytest
import torch
from test_data_harness import index_dataset, latent, members, recipe, run_recipe, write_good, write_info, write_raw

from dfmkit.data.loader import (
    DataError,
    build_train_loader,
    build_validation_batches,
    state_from_json,
    state_to_json,
)
from dfmkit.data.mock import MockLoader


def keys_of(loader) -> list[str]:
    keys = []
    for batch in loader:
        batch.validate()
        assert batch.num_tokens <= 256
        keys += batch.keys
    return keys


def _cut_inside(path, key: str, member: str) -> int:
    """Byte offset in the middle of ``key.member``'s data."""
    with tarfile.open(path) as tar:
        info = tar.getmember(f"{key}.{member}")
        return info.offset_data + info.size // 2


@pytest.fixture(scope="module")
def broken_dataset(tmp_path_factory):
    """Good shards next to deliberately broken ones; returns (root, keys every loader must deliver once)."""
    root = tmp_path_factory.mktemp("broken")
    good = write_good(root, "train-good", range(0, 20)) + write_good(root, "train-good2", range(20, 40))
    write_raw(root / "train-broken-000000.tar", [
        ("000000100", members(100, lat=torch.full((3, 1, 8, 8), float("nan")))),  # NaN latent
        ("000000101", members(101, txt=torch.zeros(3, 9))),  # wrong text width
        ("000000102", members(102, lat=latent((3, 1, 64, 64)))),  # 1024 tokens > seq_length 256
        ("000000103", {**members(103), "latent.safetensors": b"\x13garbage" * 40}),  # garbage bytes in a member
        ("000000104", {k: v for k, v in members(104).items() if k != "text.safetensors"}),  # missing member
        ("000000105", members(105)),  # a good sample inside a broken shard
        ("000000106", {**members(106), "json": b"{oops"}),
    ])
    good.append("000000105")
    written = {}  # the samples written into each shard, which `dfmkit prepare` records
    # Truncated before indexing (a copy that stopped): its 5 intact samples are read, the one cut in the middle and
    # the 4 after it (205-209) are counted as unreadable.
    write_raw(root / "train-trunc-000000.tar", [(f"{k:09d}", members(k)) for k in range(200, 210)])
    written["train-trunc-000000.tar"] = 10
    cut = _cut_inside(root / "train-trunc-000000.tar", "000000205", "latent.safetensors")
    data = (root / "train-trunc-000000.tar").read_bytes()
    (root / "train-trunc-000000.tar").write_bytes(data[:cut])
    good += [f"{k:09d}" for k in range(200, 205)]
    # Cut at a sample boundary: the tar ends cleanly early; its 3 samples are good, the 3 lost ones are counted.
    write_raw(root / "train-short-000000.tar", [(f"{k:09d}", members(k)) for k in range(250, 256)])
    written["train-short-000000.tar"] = 6
    with tarfile.open(root / "train-short-000000.tar") as tar:
        boundary = tar.getmember("000000253.latent.safetensors").offset
    (root / "train-short-000000.tar").write_bytes((root / "train-short-000000.tar").read_bytes()[:boundary])
    good += [f"{k:09d}" for k in range(250, 253)]
    # Truncated and damaged after indexing: found only when read.
    write_raw(root / "train-cut-000000.tar", [(f"{k:09d}", members(k)) for k in range(300, 310)])
    write_raw(root / "train-hdr-000000.tar", [(f"{k:09d}", members(k)) for k in range(400, 405)])
    write_info(root, shard_samples=written)
    index_dataset(root)
    cut = _cut_inside(root / "train-cut-000000.tar", "000000305", "latent.safetensors")
    data = (root / "train-cut-000000.tar").read_bytes()
    (root / "train-cut-000000.tar").write_bytes(data[:cut])
    good += [f"{k:09d}" for k in range(300, 305)]
    with tarfile.open(root / "train-hdr-000000.tar") as tar:
        header = tar.getmember("000000402.text.safetensors").offset
    damaged = bytearray((root / "train-hdr-000000.tar").read_bytes())
    damaged[header: header + 512] = b"\xa7" * 512
    (root / "train-hdr-000000.tar").write_bytes(bytes(damaged))
    good += ["000000400", "000000401", "000000403", "000000404"]
    return root, sorted(good)


@pytest.mark.parametrize("workers", [0, 2])
def test_broken_shards_skip_and_count_every_bad_sample(broken_dataset, workers):
    root, good = broken_dataset
    loader = build_train_loader(recipe(root, num_workers=workers, shuffle_buffer_size=8), repeat=False)
    keys = keys_of(loader)
    assert sorted(keys) == good  # every good sample exactly once
    skips = loader.skips.as_dict()
    # unreadable: 205-209 (cut off before indexing), 253-255 (the shard ends early), 305-309 (cut off after
    # indexing), 402 (damaged header)
    assert skips == {"nonfinite": 1, "bad_text": 1, "too_long": 1, "unreadable": 14, "undecodable": 2,
                     "missing_member": 1}
    assert loader.skips.report() == ("20 skipped (unreadable 14, undecodable 2, bad_text 1, missing_member 1, "
                                     "nonfinite 1, too_long 1)")
    damaged = json.loads((root / "dfmkit.json").read_text())["damaged_shards"]
    assert {name: (why["samples"], why["intact"]) for name, why in damaged.items()} == {
        "train-trunc-000000.tar": (10, 5), "train-short-000000.tar": (6, 3)}


def test_data_parallel_ranks_split_the_data_and_peers_agree(broken_dataset):
    root, good = broken_dataset
    r = recipe(root, shuffle_buffer_size=8)
    rank0 = keys_of(build_train_loader(r, dp_rank=0, dp_size=2, repeat=False))
    rank1 = keys_of(build_train_loader(r, dp_rank=1, dp_size=2, repeat=False))
    assert not set(rank0) & set(rank1) and sorted(rank0 + rank1) == good
    # A tensor- or context-parallel peer has the same DP rank: the same batches, tensor for tensor.
    a = build_train_loader(r, dp_rank=1, dp_size=2, pad_multiple=4)
    b = build_train_loader(r, dp_rank=1, dp_size=2, pad_multiple=4)
    for _ in range(5):
        x, y = next(a), next(b)
        assert x.keys == y.keys and torch.equal(x.latents, y.latents) and torch.equal(x.text, y.text)
        assert all(n % 4 == 0 for n in x.padded_seqlens().tolist())


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_loader_gives_the_same_next_batches(tmp_path, workers):
    write_good(tmp_path, "train-a", range(0, 30))
    write_good(tmp_path, "train-b", range(30, 60), shape=(3, 2, 8, 12))
    write_info(tmp_path)
    index_dataset(tmp_path)
    r = recipe(tmp_path, num_workers=workers, shuffle_buffer_size=10, packing_buffer_size=12)
    loader = build_train_loader(r)
    for _ in range(7):
        next(loader)
    state = json.loads(json.dumps(loader.save_state()))  # JSON all the way: no pickle
    expected = [next(loader) for _ in range(12)]  # crosses the end of an epoch
    loader.close()

    resumed = build_train_loader(r)
    resumed.restore_state(state)
    for want in expected:
        got = next(resumed)
        assert got.keys == want.keys
        assert torch.equal(got.latents, want.latents) and torch.equal(got.pos_ids, want.pos_ids)
        assert torch.equal(got.text, want.text) and torch.equal(got.cu_seqlens_kv, want.cu_seqlens_kv)
    assert resumed.samples == loader.samples
    with pytest.raises(DataError, match="data-parallel"):
        build_train_loader(r, dp_rank=0, dp_size=2).restore_state(state)
    resumed.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_rewind_goes_back_to_a_position_after_an_interrupted_fetch(tmp_path, workers):
    """A stop signal can interrupt the loader anywhere in a fetch (waiting for a worker, or reading in this process);
    rewinding to the position taken before goes back there exactly: the same batches come next, the counts of
    batches and skipped samples are those of then, and the state saved after the rewind restores it in a new
    loader."""
    nan = torch.full((3, 1, 8, 8), float("nan"))
    write_raw(tmp_path / "train-a-000000.tar", [(f"{k:09d}", members(k, lat=nan if k % 5 == 0 else None))
                                                 for k in range(60)])
    write_info(tmp_path)
    index_dataset(tmp_path)
    r = recipe(tmp_path, num_workers=workers, shuffle_buffer_size=10, packing_buffer_size=6)
    loader = build_train_loader(r)
    for _ in range(3):
        next(loader)
    position, skipped, samples = loader.position(), loader.skips.as_dict(), loader.samples
    expected = [next(loader).keys for _ in range(4)]
    assert loader.skips.as_dict() != skipped  # the batches after the position count more bad samples

    class Interrupted(BaseException):  # as the trainer's stop signal raises (not an Exception: nothing counts it)
        pass

    armed = [False]  # the timer interrupts the fetches only, once (on a busy machine it fired in pytest's own code)

    def interrupt(*_):
        if armed[0]:
            armed[0] = False
            raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.003, 0.003)
    try:
        with pytest.raises(Interrupted):
            armed[0] = True
            for _ in range(1000):
                next(loader)
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    loader.rewind(position)
    assert (loader.batches, loader.samples, loader.skips.as_dict()) == (3, samples, skipped)
    state = json.loads(json.dumps(loader.save_state()))
    assert [next(loader).keys for _ in range(4)] == expected
    loader.rewind(position)  # again, from where it had read to after the rewind
    assert loader.position()[1:3] == position[1:3] and [next(loader).keys for _ in range(4)] == expected
    loader.close()
    resumed = build_train_loader(r)
    resumed.restore_state(state)
    assert resumed.skips.as_dict() == skipped
    assert [next(resumed).keys for _ in range(4)] == expected
    resumed.close()


def test_state_codec_round_trip_and_refusals():
    from megatron.energon.rng import SystemRng
    from megatron.energon.state import FlexState

    state = {
        "rng": SystemRng.save_state(),
        "flex": FlexState(a=(1, "b", None), raw=b"\x00\xff", bf16=torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)),
        "array": np.arange(5, dtype=np.uint32),
        3: [1.5, float("inf"), np.int64(7)],
    }
    back = state_from_json(json.loads(json.dumps(state_to_json(state))))
    assert isinstance(back["flex"], FlexState) and back["flex"]["a"] == (1, "b", None) and back["flex"]["raw"] == b"\x00\xff"
    assert torch.equal(back["flex"]["bf16"], state["flex"]["bf16"]) and back["flex"]["bf16"].dtype == torch.bfloat16
    assert back["array"].dtype == np.uint32 and back["array"].tolist() == [0, 1, 2, 3, 4]
    assert back[3][1] == float("inf") and back[3][2] == 7 and isinstance(back[3][2], np.int64)
    assert torch.equal(back["rng"].torch, state["rng"].torch) and back["rng"].random == state["rng"].random
    assert back["rng"].numpy[0] == "MT19937" and np.array_equal(back["rng"].numpy[1], state["rng"].numpy[1])
    with pytest.raises(DataError, match="not one of the Energon classes"):
        state_from_json({"$dataclass": "subprocess:Popen", "fields": {}})
    with pytest.raises(TypeError, match="no JSON form"):
        state_to_json({"x": object()})


def test_missing_or_unprepared_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_train_loader(recipe(tmp_path / "nope"))
    write_good(tmp_path, "train-a", range(3))
    with pytest.raises(DataError, match="no Energon index"):
        build_train_loader(recipe(tmp_path))
    index_dataset(tmp_path)
    with pytest.raises(DataError, match="'val' split .* holds no samples"):
        build_train_loader(recipe(tmp_path), split="val")


def test_validation_batches_use_the_val_split(tmp_path):
    write_good(tmp_path, "train-a", range(0, 20))
    write_good(tmp_path, "val-a", range(100, 106))
    write_info(tmp_path)
    index_dataset(tmp_path)
    batches = build_validation_batches(recipe(tmp_path), count=5)
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == [f"{k:09d}" for k in range(100, 106)]  # fewer than asked: the split is small
    again = build_validation_batches(recipe(tmp_path), count=5)
    assert [b.keys for b in again] == [b.keys for b in batches]


def test_mock_data(tmp_path):
    r = recipe(mock=True, mock_latent_shape=[4, 2, 8, 6], mock_text_tokens=3, mock_text_dim=16, seq_length=100)
    loader = build_train_loader(r, dp_rank=0, dp_size=2, pad_multiple=8)
    assert isinstance(loader, MockLoader)
    batch = next(loader).validate()
    assert batch.num_samples == 4 and batch.latents.shape == (4 * 24, 2 * 2 * 1 * 4)  # 24 = 2*4*3 tokens
    assert batch.text.shape == (12, 16) and batch.padded_seqlens().tolist() == [24] * 4
    assert batch.pos_ids.max(0).values.tolist() == [1, 3, 2]
    state = json.loads(json.dumps(loader.save_state()))
    following = [next(loader) for _ in range(3)]
    other_rank = next(build_train_loader(r, dp_rank=1, dp_size=2, pad_multiple=8))
    assert not torch.equal(other_rank.latents, batch.latents)
    resumed = build_train_loader(r, dp_rank=0, dp_size=2, pad_multiple=8)
    resumed.restore_state(state)
    assert all(torch.equal(next(resumed).latents, want.latents) for want in following)
    assert resumed.skips.as_dict() == {}
    fixed = build_validation_batches(r, count=2, pad_multiple=8)
    assert len(fixed) == 2 and torch.equal(build_validation_batches(r, count=2, pad_multiple=8)[1].text, fixed[1].text)
    r2 = recipe(mock=True, mock_samples_per_pack=2, seq_length=4096)  # the stub model has no in_channels/text_dim
    batch = next(build_train_loader(r2))
    assert batch.num_samples == 2 and batch.latents.shape == (2048, 64) and batch.text.shape == (32, 1024)
    with pytest.raises(Exception, match="seq_length"):
        build_train_loader(recipe(mock=True, mock_latent_shape=[16, 1, 64, 64], seq_length=512))
    # More samples a pack than seq_length holds: refused up front, as real packs never exceed it (a typo of 10**9
    # would build packs of 10**9 samples).
    from dfmkit.errors import DfmkitError

    with pytest.raises(DfmkitError, match=r"^data.mock_samples_per_pack = 5 samples of 1024 tokens do not fit in "
                                          r"data.seq_length = 4096; give at most 4, or 0 \(as many as fit\)$"):
        build_train_loader(recipe(mock=True, mock_samples_per_pack=5, seq_length=4096))


def test_data_that_does_not_fit_the_model_is_a_clear_error(tmp_path):
    import attrs

    from dfmkit.hookspecs import hookimpl
    from dfmkit.plugins import PluginManager

    @attrs.define(kw_only=True)
    class DiTLike:
        patch_spatial: int = 2
        patch_temporal: int = 1
        in_channels: int = 16
        text_dim: int = 1024

    class Plugin:
        @hookimpl
        def dfmkit_register(self, registries):
            registries.backbone.register("test-dit", dict, options=DiTLike)
            registries.text_encoder.register("test-hash", dict)

    plugins = PluginManager(entry_points=False, extra=[(Plugin(), "tests")])
    write_good(tmp_path, "train-a", range(3))
    write_info(tmp_path)  # 3 channels, width 8
    index_dataset(tmp_path)
    with pytest.raises(DataError, match="3-channel latents but model.in_channels = 16.*width 8 but model.text_dim = 1024"):
        build_train_loader(recipe(tmp_path, plugins=plugins))
    with pytest.raises(DataError, match="mock data has text states of width 8 but model.text_dim = 1024.*mock_text_dim = 0"):
        build_train_loader(recipe(mock=True, mock_latent_shape=[16, 1, 8, 8], mock_text_dim=8, plugins=plugins))
    batch = next(build_train_loader(recipe(mock=True, seq_length=1024, plugins=plugins)))  # sizes from the model
    assert batch.latents.shape == (1024, 2 * 2 * 16) and batch.text.shape == (16, 1024)


# --------------------------------------------------------------------------------------------
# Damaged shards, exact counts, a pack smaller than every sample (#26)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["cut off, indexed again", "zero bytes, indexed again", "zero-byte .tar.idx"])
def test_a_damaged_shard_keeps_its_intact_samples_and_counts_each_lost_one(tmp_path, damage, caplog):
    good = write_good(tmp_path, "train-good", range(100))
    bad = write_good(tmp_path, "train-bad", range(100, 200))
    write_info(tmp_path)
    index_dataset(tmp_path)  # records the samples of each shard, which the next index compares with
    shard = tmp_path / "train-bad-000000.tar"
    if damage == "cut off, indexed again":
        shard.write_bytes(shard.read_bytes()[:_cut_inside(shard, "000000150", "latent.safetensors")])
        index_dataset(tmp_path)
        intact = bad[:50]
    elif damage == "zero bytes, indexed again":
        shard.write_bytes(b"")
        index_dataset(tmp_path)
        intact = []
    else:
        shard.with_suffix(".tar.idx").write_bytes(b"")
        intact = bad
    caplog.set_level(logging.WARNING, logger="dfmkit.data")
    loader = build_train_loader(recipe(tmp_path), repeat=False)
    assert sorted(keys_of(loader)) == good + intact
    lost = len(bad) - len(intact)
    assert loader.skips.as_dict() == ({"unreadable": lost} if lost else {})
    said = [record.getMessage() for record in caplog.records]
    assert any("train-bad-000000.tar" in line for line in said)
    assert all("train-bad-000000.tar" in line for line in said if "unreadable" in line or "damaged" in line)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_sample_counts_once_and_the_counts_are_the_same_after_a_resume(tmp_path, workers):
    nan = torch.full((3, 1, 8, 8), float("nan"))
    write_raw(tmp_path / "train-a-000000.tar", [(f"{k:09d}", members(k, lat=nan if k % 4 == 0 else None))
                                                 for k in range(120)])
    write_info(tmp_path)
    index_dataset(tmp_path)
    r = recipe(tmp_path, num_workers=workers, packing_buffer_size=8)
    whole = build_train_loader(r)
    counts = []
    for _ in range(40):  # about 2.5 passes over the data
        next(whole)
        counts.append(whole.skips.total)
    whole.close()
    assert counts[0] < 30 and counts[-1] == max(counts) == 30  # the 30 NaN samples, each once

    first = build_train_loader(r)
    for _ in range(6):
        next(first)
    state = json.loads(json.dumps(first.save_state()))
    first.close()
    resumed = build_train_loader(r)
    resumed.restore_state(state)
    after = []
    for _ in range(34):
        next(resumed)
        after.append(resumed.skips.total)
    resumed.close()
    assert after == counts[6:]
    # An older loader state holds plain counts by reason.
    old = build_train_loader(r)
    old.restore_state({**state, "skips": {"nonfinite": 5}})
    assert old.skips.as_dict() == {"nonfinite": 5}


def _too_long_dataset(root, record: bool) -> None:
    """12 samples of 16 tokens (latents [3, 1, 8, 8], 2x2 patches); with or without the shapes `dfmkit prepare`
    records."""
    write_good(root, "train-a", range(12))
    shapes = {"train": {"smallest": [3, 1, 8, 8], "largest": [3, 1, 8, 8]}}
    write_info(root, **({"latent_shapes": shapes} if record else {}))
    index_dataset(root)


def test_a_pack_smaller_than_the_smallest_sample_is_refused_before_any_work(tmp_path):
    _too_long_dataset(tmp_path, record=True)
    with pytest.raises(DataError, match=r"the smallest sample of the 'train' split of .* \(latent \[3, 1, 8, 8\]\) "
                                        r"makes 16 tokens with the recipe's 1x2x2 patches and padding to a multiple "
                                        r"of 1, more than a pack holds \(data.seq_length = 8\).*at least 16"):
        build_train_loader(recipe(tmp_path, seq_length=8))
    with pytest.raises(DataError, match="makes 24 tokens .* multiple of 12"):  # padded per sample
        build_train_loader(recipe(tmp_path, seq_length=20), pad_multiple=12)
    assert next(build_train_loader(recipe(tmp_path, seq_length=16))).num_samples == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_without_that_record_a_loader_that_skips_every_sample_stops(tmp_path, workers):
    _too_long_dataset(tmp_path, record=False)
    loader = build_train_loader(recipe(tmp_path, seq_length=8, num_workers=workers))

    class Hung(BaseException):  # not an Exception: Energon's error handling would count it as a bad sample
        pass

    def hung(*_):
        raise Hung("the loader looked for a usable sample for 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        part = 12 // max(1, workers)
        with pytest.raises(DataError, match=rf"no sample of the {part} samples of .* that this loader process reads "
                                            r".* fits a pack: even the smallest, train-a-000000.tar/\d+: latent "
                                            r"\[3, 1, 8, 8\] makes 16 tokens .*data.seq_length = 8.*at least 16"):
            next(loader)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        loader.close()


def test_one_usable_sample_among_too_long_ones_keeps_the_loader_going(tmp_path):
    write_good(tmp_path, "train-a", range(11), shape=(3, 1, 8, 16))  # 32 tokens
    write_good(tmp_path, "train-b", [11])  # 16 tokens
    write_info(tmp_path)
    index_dataset(tmp_path)
    loader = build_train_loader(recipe(tmp_path, seq_length=16, packing_buffer_size=2))
    assert [next(loader).keys for _ in range(4)] == [["000000011"]] * 4
    assert loader.skips.as_dict() == {"too_long": 11}


def test_dfmkit_run_ends_with_the_skipped_samples_by_reason(tmp_path, capsys):
    from dfmkit.cli import main

    nan = torch.full((3, 1, 8, 8), float("nan"))
    write_raw(tmp_path / "train-a-000000.tar", [(f"{k:09d}", members(k, lat=nan if k % 4 == 0 else None))
                                                 for k in range(8)])  # one packing buffer: all read by step 1
    write_info(tmp_path)
    index_dataset(tmp_path)
    (tmp_path / "run.toml").write_text(run_recipe(tmp_path, tmp_path / "ck", train_iters=2))
    assert main(["run", str(tmp_path / "run.toml")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "data: 2 skipped (nonfinite 2)"
