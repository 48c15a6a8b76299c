"""The `packed` task encoder: decode, checks and skip reasons, patchify/pad, first-fit-decreasing packing."""

from __future__ import annotations

import json
import random

import pytest
import torch
from megatron.energon import SkipSample
from test_data_harness import TEXT_DIM, latent, members, recipe, text

from dfmkit.batch import Sample, pack, patchify, unpack
from dfmkit.components.task_encoders import PackedOptions
from dfmkit.components.task_encoders.packed import PackedTaskEncoder, build, first_fit_decreasing
from dfmkit.data.shards import encode_tensor
from dfmkit.data.skips import SkipCounter
from dfmkit.plugins import PluginManager


def encoder(**kwargs) -> PackedTaskEncoder:
    defaults = dict(seq_length=256, patch_spatial=2, patch_temporal=1, pad_multiple=1,
                    text_dim=TEXT_DIM, latent_channels=3, skips=SkipCounter())
    defaults.update(kwargs)
    return PackedTaskEncoder(**defaults)


def crude(key: int, **parts) -> dict:
    sample = {"__key__": f"{key:09d}", "__restore_key__": ("Webdataset", key), "__subflavors__": None,
              "__sources__": (), "__shard__": "train-r000-000000.tar", **members(key)}
    for name, value in parts.items():
        name = name.replace("_", ".")
        if value is None:
            sample.pop(name)
        else:
            sample[name] = value
    return sample


def test_registered_and_built_from_the_recipe():
    component = PluginManager(entry_points=False).registries.task_encoder.get("packed")
    te = component.build(PackedOptions(max_text_tokens=5), recipe=recipe(seq_length=512), pad_multiple=4,
                         dataset_info={"text_dim": 16, "latent_channels": 4})
    assert (te.seq_length, te.patch_spatial, te.patch_temporal, te.pad_multiple) == (512, 2, 1, 4)
    assert (te.text_dim, te.latent_channels, te.options.max_text_tokens) == (16, 4, 5)
    overridden = build(PackedOptions(text_dim=32), recipe=recipe(), dataset_info={"text_dim": 16})
    assert overridden.text_dim == 32


def test_cooked_sample_matches_the_reference_packing():
    te = encoder(pad_multiple=8)
    shapes = [(3, 1, 8, 8), (3, 1, 6, 10), (3, 3, 4, 4)]  # mixed image sizes and a 3-frame video
    cooked, reference = [], []
    for key, shape in enumerate(shapes):
        lat = latent(shape, key)
        txt = text(2 + key, key)
        cooked.append(te.cook(crude(key, latent_safetensors=encode_tensor(lat, "latent"),
                                    text_safetensors=encode_tensor(txt, "text"))))
        reference.append(Sample(latent=lat, text=txt, key=f"{key:09d}"))
    assert [c.seqlen for c in cooked] == [16, 15, 12]
    assert [c.tokens.shape[0] for c in cooked] == [16, 16, 16]  # padded to the multiple of 8
    packed = te.pack_selected_samples(cooked).to_batch().validate()
    expected = pack(reference, 2, 1, pad_multiple=8)
    for field in ("latents", "seqlens", "cu_seqlens", "text", "seqlens_kv", "cu_seqlens_kv", "pos_ids", "latent_shapes"):
        assert torch.equal(getattr(packed, field), getattr(expected, field)), field
    assert packed.keys == expected.keys
    # every sample comes back out of the pack
    for original, restored in zip(reference, unpack(packed, packed.latents, 2, 1)):
        assert torch.equal(original.latent, restored)
    # (t, h, w) positions of the video sample
    start = int(packed.cu_seqlens[2])
    assert packed.pos_ids[start: start + 12].tolist()[:5] == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]]
    assert packed.pos_ids[start + 12: start + 16].abs().sum() == 0


def test_temporal_patches_and_dtype_kept():
    te = encoder(patch_temporal=2)
    lat = latent((3, 4, 4, 4), 1, dtype=torch.bfloat16)
    cooked = te.cook(crude(1, latent_safetensors=encode_tensor(lat, "latent")))
    assert cooked.tokens.dtype == torch.bfloat16 and cooked.tokens.shape == (8, 2 * 2 * 2 * 3)
    assert cooked.latent_shape == (3, 4, 4, 4)
    # one pack of bf16 latents, fp32 text and int32 positions (they travel in one byte buffer)
    other = te.cook(crude(2, latent_safetensors=encode_tensor(latent((3, 2, 6, 2), 2, dtype=torch.bfloat16), "latent")))
    batch = te.pack_selected_samples([cooked, other]).to_batch().validate()
    assert (batch.latents.dtype, batch.text.dtype, batch.pos_ids.dtype) == (torch.bfloat16, torch.float32, torch.int32)
    assert torch.equal(batch.latents[:8], patchify(lat, 2, 2)) and torch.equal(batch.text[:3], text(3, 1))
    assert batch.cu_seqlens.tolist() == [0, 8, 11] and batch.pos_ids[8:].tolist() == [[0, 0, 0], [0, 1, 0], [0, 2, 0]]


BAD = {
    "nonfinite": dict(latent_safetensors=encode_tensor(torch.full((3, 1, 8, 8), float("nan")), "latent")),
    "too_long": dict(latent_safetensors=encode_tensor(torch.zeros(3, 1, 64, 64), "latent")),  # 1024 > 256 tokens
    "bad_text": dict(text_safetensors=encode_tensor(torch.zeros(3, TEXT_DIM + 1), "text")),
    "bad_latent": dict(latent_safetensors=encode_tensor(torch.zeros(4, 1, 8, 8), "latent")),
    "undecodable": dict(latent_safetensors=b"\x00garbage\xff" * 7),
    "missing_member": dict(text_safetensors=None),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_samples_are_skipped_and_counted(reason, caplog):
    te = encoder()
    with pytest.raises(SkipSample):
        te.cook(crude(3, **BAD[reason]))
    assert te.skips.as_dict() == {reason: 1}
    assert reason in caplog.text and "000000003" in caplog.text


def test_more_bad_cases():
    te = encoder(options=PackedOptions(max_abs_latent=10.0))
    cases = [
        ("nonfinite", dict(latent_safetensors=encode_tensor(torch.full((3, 1, 8, 8), 20.0), "latent"))),
        ("nonfinite", dict(latent_safetensors=encode_tensor(torch.full((3, 1, 8, 8), float("-inf")), "latent"))),
        ("bad_text", dict(text_safetensors=encode_tensor(torch.zeros(0, TEXT_DIM), "text"))),
        ("bad_text", dict(text_safetensors=encode_tensor(torch.full((2, TEXT_DIM), float("inf")), "text"))),
        ("bad_latent", dict(latent_safetensors=encode_tensor(torch.zeros(3, 1, 7, 8), "latent"))),  # odd: no 2x2 patches
        ("bad_latent", dict(latent_safetensors=encode_tensor(torch.zeros(3, 8, 8, dtype=torch.int32), "latent"))),
        ("bad_latent", dict(latent_safetensors=encode_tensor(torch.zeros(3, 1, 0, 8), "latent"))),
        ("undecodable", dict(json=b"{not json")),
        ("undecodable", dict(json=json.dumps([1, 2]).encode())),
        ("undecodable", dict(text_safetensors=encode_tensor(torch.zeros(3, TEXT_DIM), "something_else"))),
        ("missing_member", dict(json=None)),
    ]
    for key, (reason, parts) in enumerate(cases, start=10):
        before = te.skips.as_dict().get(reason, 0)
        for _ in range(2):  # a bad sample is counted once, however often it is read
            with pytest.raises(SkipSample):
                te.cook(crude(key, **parts))
        assert te.skips.as_dict()[reason] == before + 1, (reason, parts)
    # A leading batch dimension is accepted (the reference's tokenizer output); long text is cut.
    te = encoder(options=PackedOptions(max_text_tokens=2))
    cooked = te.cook(crude(6, latent_safetensors=encode_tensor(latent((1, 3, 1, 8, 8)), "latent"),
                           text_safetensors=encode_tensor(text(5), "text")))
    assert cooked.latent_shape == (3, 1, 8, 8) and cooked.text.shape == (2, TEXT_DIM)


def test_first_fit_decreasing():
    assert first_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 10) == [[0, 1, 6], [2, 3, 4, 5]]
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 60))]
        bins = first_fit_decreasing(lengths, 100)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
        assert len(bins) <= -(-sum(lengths) * 11 // 9 // 100) + 1  # FFD is within 11/9 OPT + 1


def test_select_samples_to_pack_keeps_every_sample_once_and_is_deterministic():
    te = encoder(seq_length=64)
    rng = random.Random(1)
    samples = []
    for key in range(40):
        shape = (3, rng.choice([1, 2]), 2 * rng.randint(1, 4), 2 * rng.randint(1, 6))
        samples.append(te.cook(crude(key, latent_safetensors=encode_tensor(latent(shape, key), "latent"))))
    packs = te.select_samples_to_pack(samples)
    assert sorted(s.__key__ for p in packs for s in p) == sorted(s.__key__ for s in samples)
    assert all(sum(s.tokens.shape[0] for s in p) <= 64 for p in packs)
    real = sum(s.seqlen for s in samples)
    assert real / (len(packs) * 64) > 0.85
    again = te.select_samples_to_pack(list(samples))
    assert [[s.__key__ for s in p] for p in again] == [[s.__key__ for s in p] for p in packs]
