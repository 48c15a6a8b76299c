"""`dfmkit prepare`: sources (digits, parquet, folder, hf offline), resizing, shard layout, splits, CLI, torchrun."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_harness import TEXT_DIM, HashTextEncoder, data_plugins, recipe, recipe_dict

from dfmkit.data.loader import build_train_loader
from dfmkit.data.prepare import PrepareError, prepare, rank_slice, split_of
from dfmkit.data.shards import DATASET_INFO, decode_tensor
from dfmkit.data.sources import ResizeOptions, SourceError, open_source, target_size


def tar_members(root: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                out[member.name] = tar.extractfile(member).read()
    return out


def samples_by_key(root: Path) -> dict[str, dict]:
    """key -> {"latent", "text", "meta"} decoded from every shard."""
    found: dict[str, dict] = {}
    for name, data in tar_members(root).items():
        key, part = name.split(".", 1)
        entry = found.setdefault(key, {})
        if part == "json":
            entry["meta"] = json.loads(data)
        else:
            what, fmt = part.split(".")
            entry[what] = decode_tensor(data, what, fmt)
    return found


def delivered(loader) -> list[str]:
    keys = []
    for batch in loader:
        batch.validate()
        keys += batch.keys
    return keys


# ------------------------------------------------------------------------------------------------


def test_digits_end_to_end_with_t5_tiny(tmp_path):
    out = tmp_path / "digits"
    result = prepare(recipe_dict(out, text_encoder="t5-tiny", split=[0.75, 0.25, 0.0]), "digits", out,
                     plugins=data_plugins(), limit=24)
    splits = [split_of(i, (0.75, 0.25, 0.0)) for i in range(24)]
    assert result.samples == {s: splits.count(s) for s in ("train", "val", "test")} and result.skips == {}
    assert abs(result.samples["val"] - 6) <= 1

    info = json.loads((out / DATASET_INFO).read_text())
    assert info["latent_channels"] == 3 and info["text_dim"] == 64 and info["samples"] == result.samples
    assert info["text_encoder"]["name"] == "t5-tiny" and info["text_encoder"]["identity"].startswith("t5-tiny:")
    assert (out / ".nv-meta" / "dataset.yaml").read_text().count("CrudeWebdataset") == 1

    # Layout: only safetensors and json members, three per sample; no pickle anywhere.
    names = list(tar_members(out))
    assert len(names) == 3 * 24
    assert {n.split(".", 1)[1] for n in names} == {"latent.safetensors", "text.safetensors", "json"}

    from sklearn.datasets import load_digits

    labels = load_digits().target
    from dfmkit.plugins import PluginManager

    t5 = PluginManager(entry_points=False).registries.text_encoder.get("t5-tiny").build()
    for key, sample in samples_by_key(out).items():
        index, meta = int(key), sample["meta"]
        assert meta["caption"] == f"a handwritten digit {labels[index]}"
        assert (meta["original_height"], meta["original_width"], meta["original_frames"]) == (8, 8, 1)
        assert meta["latent_shape"] == [3, 1, 16, 16] and meta["fps"] == 30.0
        assert sample["latent"].dtype == torch.float32 and sample["latent"].abs().max() <= 1.0
        # the text states are stored exactly, at their true length (no padding rows)
        expected = t5.encode([meta["caption"]])[0]
        assert torch.equal(sample["text"], expected) and meta["text_length"] == expected.shape[0]

    # The folder loads at once.
    loader = build_train_loader(recipe(out), repeat=False)
    keys = delivered(loader)
    assert sorted(keys) == sorted(k for k in samples_by_key(out) if split_of(int(k), (0.75, 0.25, 0.0)) == "train")


def test_digits_upsampling_and_split_are_deterministic(tmp_path):
    options = ResizeOptions(image_size=32, size_multiple=16, mode="nearest")
    item = open_source("digits", options).load(5)
    assert item.pixels.shape == (3, 1, 32, 32) and item.pixels.dtype == torch.float32
    assert item.pixels.min() >= -1 and item.pixels.max() <= 1
    # nearest: each source pixel becomes a 4x4 block; values 0..16 map linearly to [-1, 1]
    from sklearn.datasets import load_digits

    grey = torch.tensor(load_digits().images[5], dtype=torch.float32) / 16 * 2 - 1
    assert torch.allclose(item.pixels[0, 0, ::4, ::4], grey)
    assert item.caption == f"a handwritten digit {load_digits().target[5]}"

    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(10000):
        counts[split_of(i, (0.9, 0.05, 0.05))] += 1
    assert abs(counts["val"] - 500) <= 5 and abs(counts["test"] - 500) <= 5
    assert [split_of(i, (1, 0, 0)) for i in range(50)] == ["train"] * 50
    slices = [rank_slice(103, r, 4) for r in range(4)]
    assert [i for s in slices for i in s] == list(range(103))


def test_resize_rules():
    assert target_size(480, 640, 512, 16) == (512, 688)  # short side to 512, long side 682.7 -> 688
    assert target_size(40, 60, 32, 16) == (32, 48)
    assert target_size(30, 30, 0, 16) == (32, 32)  # 0 keeps the size, rounded to the multiple
    assert target_size(8, 8, 64, 16) == (64, 64)


def _png(width: int, height: int, color=(200, 30, 60)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_source_columns_resizing_and_bad_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        ({"bytes": _png(60, 40), "path": None}, "Papilio machaon"),
        ({"bytes": _png(30, 30), "path": None}, "Danaus plexippus"),
        ({"bytes": b"not an image", "path": None}, "Broken"),
        ({"bytes": _png(16, 16), "path": None}, ""),
    ]
    table = pa.table({"image": [r[0] for r in rows], "name": [r[1] for r in rows], "other": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "butterflies.parquet")

    with pytest.raises(SourceError, match="no column 'caption'.*--caption-column"):
        open_source(str(tmp_path / "butterflies.parquet"), ResizeOptions())

    out = tmp_path / "out"
    result = prepare(recipe_dict(out, image_size=32), str(tmp_path / "butterflies.parquet"), out,
                     plugins=data_plugins(), caption_column="name")
    assert result.samples["train"] == 2
    assert result.skips == {"unreadable_source": 1, "no_caption": 1}
    samples = samples_by_key(out)
    by_caption = {s["meta"]["caption"]: s for s in samples.values()}
    first = by_caption["Papilio machaon"]
    assert (first["meta"]["original_height"], first["meta"]["original_width"]) == (40, 60)
    assert first["latent"].shape == (3, 1, 32, 48)  # short side 40 -> 32, long 60 -> 48
    assert torch.allclose(first["latent"][:, 0, 5, 5], torch.tensor([200, 30, 60]) / 255 * 2 - 1, atol=1e-5)
    assert torch.equal(by_caption["Danaus plexippus"]["text"], HashTextEncoder().encode(["Danaus plexippus"])[0])


def test_folder_source_images_videos_and_captions(tmp_path):
    from PIL import Image

    folder = tmp_path / "media"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(_png(32, 16))
    (folder / "a.txt").write_text("a red rectangle\n")
    (folder / "sub" / "b.jpg").write_bytes(_png(16, 16))
    (folder / "captions.jsonl").write_text(json.dumps({"file": "sub/b.jpg", "caption": "a square"}) + "\n")
    frames = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(5)]
    frames[0].save(folder / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (folder / "clip.txt").write_text("a fading clip")
    import imageio.v3 as iio

    movie = np.zeros((9, 32, 48, 3), dtype=np.uint8)
    movie[:, :, :24] = 255
    iio.imwrite(folder / "sub" / "movie.mp4", movie, fps=12, codec="libx264")
    (folder / "sub" / "movie.txt").write_text("half white")
    (folder / "nocaption.png").write_bytes(_png(16, 16))
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    (folder / "broken.txt").write_text("broken")

    out = tmp_path / "out"
    result = prepare(recipe_dict(out, image_size=16, max_frames=4), str(folder), out, plugins=data_plugins())
    assert result.samples["train"] == 4 and result.skips == {"no_caption": 1, "unreadable_source": 1}
    by_caption = {s["meta"]["caption"]: s for s in samples_by_key(out).values()}
    assert set(by_caption) == {"a red rectangle", "a square", "a fading clip", "half white"}
    movie = by_caption["half white"]
    assert movie["latent"].shape == (3, 4, 16, 32) and movie["meta"]["fps"] == 12.0  # 32x48: 16 x 24 -> 32
    assert movie["meta"]["original_frames"] == 9 and movie["meta"]["original_width"] == 48
    assert movie["latent"][:, :, :, :12].mean() > 0.9 and movie["latent"][:, :, :, -12:].mean() < -0.9
    clip = by_caption["a fading clip"]
    assert clip["latent"].shape == (3, 4, 16, 16)  # max_frames cuts 5 frames to 4
    assert clip["meta"]["original_frames"] == 5 and clip["meta"]["fps"] == pytest.approx(10.0)
    assert by_caption["a red rectangle"]["latent"].shape == (3, 1, 16, 32)
    assert by_caption["a square"]["meta"]["file"] == "sub/b.jpg"


def test_empty_and_unreadable_captions_are_skipped(tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    for name in "abcdef":
        (folder / f"{name}.png").write_bytes(_png(16, 16))
    (folder / "a.txt").write_text("a square")
    (folder / "b.txt").write_text("  \n\t")  # whitespace only
    (folder / "e.txt").write_bytes("caf\u00e9".encode("latin-1"))  # not UTF-8
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file": "c.png", "caption": ""}, {"file": "d.png", "caption": None}, {"file": "f.png", "caption": " x "}]))
    out = tmp_path / "out"
    result = prepare(recipe_dict(out, image_size=16), str(folder), out, plugins=data_plugins())
    assert result.samples["train"] == 2 and result.skips == {"no_caption": 3, "unreadable_source": 1}
    assert {s["meta"]["caption"] for s in samples_by_key(out).values()} == {"a square", "x"}


class _Items:
    """A source of any kind (here: a plugin's) whose captions may be blank."""

    description = "items"

    def __init__(self, captions):
        self.captions = captions

    def __len__(self):
        return len(self.captions)

    def load(self, index):
        from dfmkit.data.sources import SourceItem

        return SourceItem(name=f"item {index}", pixels=torch.zeros(3, 1, 16, 16), caption=self.captions[index], meta={})


def test_a_blank_caption_from_any_source_is_skipped(tmp_path):
    out = tmp_path / "out"
    result = prepare(recipe_dict(out, image_size=16), _Items(["one", "", " \n", "two"]), out, plugins=data_plugins())
    assert result.samples["train"] == 2 and result.skips == {"no_caption": 2}


def test_a_broken_dataset_info_names_the_file(tmp_path):
    from dfmkit.data.shards import read_dataset_info
    from dfmkit.errors import DfmkitError

    for text in ("{not json", "[1, 2]", "\"a string\""):
        (tmp_path / DATASET_INFO).write_text(text)
        with pytest.raises(DfmkitError, match=f"{tmp_path / DATASET_INFO}: .*JSON object"):
            read_dataset_info(tmp_path)
    (tmp_path / DATASET_INFO).write_bytes(b"\xff\xfe{}")
    with pytest.raises(DfmkitError, match="dfmkit.json"):
        read_dataset_info(tmp_path)


def test_hf_source_without_network_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as error:
        open_source("hf:huggan/smithsonian_butterflies_subset", ResizeOptions())
    message = str(error.value)
    assert "huggan/smithsonian_butterflies_subset" in message and "network" in message and "--source" in message


def test_unknown_source_and_existing_output(tmp_path):
    with pytest.raises(SourceError, match="unknown source"):
        open_source(str(tmp_path / "missing"), ResizeOptions())
    out = tmp_path / "out"
    prepare(recipe_dict(out), "digits", out, plugins=data_plugins(), limit=4)
    with pytest.raises(PrepareError, match="--overwrite"):
        prepare(recipe_dict(out), "digits", out, plugins=data_plugins(), limit=4)
    again = prepare(recipe_dict(out), "digits", out, plugins=data_plugins(), limit=6, overwrite=True)
    assert again.total == 6 and len(samples_by_key(out)) == 6


def test_npy_format_keeps_dtype_and_loads(tmp_path):
    out = tmp_path / "npy"
    prepare(recipe_dict(out), "digits", out, plugins=data_plugins(), limit=6, fmt="npy")
    names = tar_members(out)
    latent_member = next(n for n in names if n.endswith(".latent.npy"))
    array = np.load(io.BytesIO(names[latent_member]), allow_pickle=False)
    assert array.dtype == np.float32 and array.shape == (3, 1, 16, 16)
    assert len(delivered(build_train_loader(recipe(out), repeat=False))) == 6


def test_cli_prepare(tmp_path, monkeypatch, capsys):
    import tomli_w

    import dfmkit.job
    from dfmkit.cli import main

    plugins = data_plugins()
    monkeypatch.setattr(dfmkit.job, "default_plugins", lambda: plugins)
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(tomli_w.dumps(recipe_dict()))
    out = tmp_path / "cli"
    args = ["prepare", str(recipe_file), "data.image_size=32", "--source", "digits", "--out", str(out), "--limit", "10",
            "--split", "8,2,0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote 10 samples (train 8, val 2)" in printed and f"data.path={out}" in printed
    assert {s["latent"].shape for s in samples_by_key(out).values()} == {(3, 1, 32, 32)}
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err


def _rank_main(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    prepare(recipe_dict(out, split=[0.8, 0.2, 0.0]), "digits", out, plugins=data_plugins(), limit=21)


def test_torchrun_ranks_write_their_own_shards(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ranks"
    mp.spawn(_rank_main, args=(2, port, str(out)), nprocs=2, join=True)
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert {name.split("-")[1] for name in shards} == {"r000", "r001"}
    keys = sorted(samples_by_key(out))
    assert keys == [f"{i:09d}" for i in range(21)]  # each item once, whichever rank encoded it
    info = json.loads((out / DATASET_INFO).read_text())
    assert sum(info["samples"].values()) == 21 and info["text_dim"] == TEXT_DIM
    assert len(delivered(build_train_loader(recipe(out), repeat=False))) == info["samples"]["train"]
