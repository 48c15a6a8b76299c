"""Text encoders: t5 (a tiny T5 built in the test), t5-tiny (made on first use) and the embeddings cache."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfmkit.components.text_encoders.base import MissingArtifactError, TextEncoder
from dfmkit.components.text_encoders.cache import EmbeddingCache
from dfmkit.components.text_encoders.t5 import T5Options, T5TextEncoder
from dfmkit.components.text_encoders.t5_tiny import MARKER, T5TinyOptions, create, ensure
from dfmkit.errors import DfmkitError
from dfmkit.plugins import BUILTIN_PLUGINS, PluginManager

CORPUS = [
    "a small red fox jumps over the lazy dog",
    "the butterfly has blue wings with black spots",
    "a photo of a handwritten digit on white paper",
    "one two three four five six seven eight nine zero",
]
TEXTS = ["a red fox", "", "the blue butterfly with black wings jumps over a dog", "zero", "a red fox"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    """A tiny T5 in save_pretrained layout: random weights from T5Config, a vocabulary trained right here."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = tmp_path_factory.mktemp("t5")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(folder / "spiece"), vocab_size=60, model_type="bpe",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    tokenizer = T5Tokenizer.from_pretrained(str(folder), extra_ids=0)
    tokenizer.save_pretrained(str(folder))
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0)
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(str(folder))
    return folder


def registry():
    return PluginManager(builtins=["dfmkit.components.text_encoders"], entry_points=False).registries.text_encoder


def t5(folder, **options) -> T5TextEncoder:
    return registry().get("t5").build(T5Options(path=str(folder), device="cpu", **options))


def test_text_encoders_are_built_in():
    assert "dfmkit.components.text_encoders" in BUILTIN_PLUGINS
    assert {"t5", "t5-tiny"} <= set(PluginManager(entry_points=False).registries.text_encoder.names())


# ---------------------------------------------------------------------------------------- t5


def test_states_at_true_length(t5_dir):
    from transformers import T5EncoderModel

    enc = t5(t5_dir, dtype="fp32")
    assert isinstance(enc, TextEncoder)
    assert enc.dim == 32 and enc._model is None  # dim comes from config.json, no weights loaded
    states = enc.encode(TEXTS)
    ids = enc.tokenize(TEXTS)
    assert [s.shape for s in states] == [(len(i), 32) for i in ids]
    assert states[1].shape == (1, 32)  # an empty caption still has its EOS token
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in states)
    assert all(i[-1] == enc._tokenizer.eos_token_id for i in ids)
    torch.testing.assert_close(states[0], states[4])
    # The same as running the model on the caption alone, without padding:
    model = T5EncoderModel.from_pretrained(str(t5_dir)).eval()
    alone = model(input_ids=torch.tensor([ids[2]])).last_hidden_state[0]
    torch.testing.assert_close(states[2], alone, atol=1e-5, rtol=1e-5)


def test_batching_does_not_change_states(t5_dir):
    batched = t5(t5_dir, dtype="fp32", batch_size=8).encode(TEXTS)
    single = t5(t5_dir, dtype="fp32", batch_size=1).encode(TEXTS)
    for a, b in zip(batched, single):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert t5(t5_dir).encode([]) == []
    with pytest.raises(TypeError, match="list of texts"):
        t5(t5_dir).encode("a red fox")


def test_bf16_and_fp32(t5_dir):
    full = t5(t5_dir, dtype="fp32").encode(TEXTS)
    half = t5(t5_dir).encode(TEXTS)  # bf16 is the default, as in the reference
    for a, b in zip(full, half):
        assert b.dtype == torch.bfloat16 and a.shape == b.shape
        torch.testing.assert_close(b.float(), a, atol=0.1, rtol=0.05)
    assert t5(t5_dir).identity != t5(t5_dir, dtype="fp32").identity


def test_truncation_keeps_eos_and_reports(t5_dir, caplog):
    enc = t5(t5_dir, dtype="fp32", max_length=4)
    long = "the butterfly has blue wings with black spots"
    counts = enc.token_counts([long, "a"])
    assert counts[0] > 4
    with caplog.at_level(logging.WARNING, logger="dfmkit"):
        states = enc.encode([long, "a"])
    assert "1 of 2 texts have more than max_length=4 tokens" in caplog.text
    assert states[0].shape == (4, 32) and states[1].shape == (counts[1], 32)  # the truncated length
    untruncated = t5(t5_dir, dtype="fp32").tokenize([long])[0]
    assert enc.tokenize([long])[0] == untruncated[:3] + [enc._tokenizer.eos_token_id]
    assert "max_length=4" in enc.identity


def test_missing_folder_names_files_and_hub_repo(tmp_path, t5_dir):
    with pytest.raises(MissingArtifactError) as info:
        t5(tmp_path / "nope")
    message = str(info.value)
    assert "does not exist" in message
    for name in ("config.json", "model.safetensors", "tokenizer.json", "spiece.model", "google-t5/t5-11b"):
        assert name in message
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text((t5_dir / "config.json").read_text())
    with pytest.raises(MissingArtifactError, match=r"lacks model\.safetensors \(or pytorch_model\.bin\), tokenizer"):
        t5(tmp_path / "partial")


def test_hub_id_offline_error_names_repo(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = T5TextEncoder("google-t5/t5-small", cache_dir=str(tmp_path), device="cpu")  # cheap: nothing loaded yet
    with pytest.raises(MissingArtifactError) as info:
        enc.dim
    assert "google-t5/t5-small" in str(info.value) and "config.json" in str(info.value)


# ----------------------------------------------------------------------------------- t5-tiny


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return ensure(T5TinyOptions(path=str(root / "a"))), ensure(T5TinyOptions(path=str(root / "b")))


def test_t5_tiny_is_deterministic(tiny_dirs):
    a, b = tiny_dirs
    for name in ("model.safetensors", "spiece.model", "tokenizer.json", "config.json", MARKER):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    captions = [f"a handwritten digit {i}" for i in range(10)]
    first = registry().get("t5-tiny").build(T5TinyOptions(path=str(a))).encode(captions)
    second = registry().get("t5-tiny").build(T5TinyOptions(path=str(b))).encode(captions)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert first[0].shape == (8, 64) and first[0].dtype == torch.float32


def test_t5_tiny_captions_differ_clearly(tiny_dirs):
    enc = T5TextEncoder(str(tiny_dirs[0]), dtype="fp32", device="cpu")  # the same loading code as `t5`
    states = enc.encode([f"a handwritten digit {i}" for i in range(10)] + ["A Handwritten Digit 3"])
    for i in range(10):
        for j in range(i + 1, 10):
            assert (states[i] - states[j]).norm() > 0.2 * states[i].norm(), (i, j)
    torch.testing.assert_close(states[3], states[10])  # case-folded vocabulary
    tokens = enc.tokenize(["a handwritten digit 7"])[0]
    assert enc._tokenizer.convert_ids_to_tokens(tokens)[-2:] == ["7", "</s>"]  # the digit is a token of its own


def test_t5_tiny_reuses_and_guards_its_folder(tiny_dirs, tmp_path):
    a = tiny_dirs[0]
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert ensure(T5TinyOptions(path=str(a))) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp  # loaded, not rebuilt
    with pytest.raises(DfmkitError, match="built from other options"):
        ensure(T5TinyOptions(path=str(a), seed=1))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DfmkitError, match="not a t5-tiny folder"):
        ensure(T5TinyOptions(path=str(tmp_path / "other")))
    identity = T5TinyOptions().fingerprint()[:16]
    with pytest.raises(ValueError, match="num_heads"):
        T5TinyOptions(num_heads=5)
    assert identity != T5TinyOptions(corpus=["a b c"]).fingerprint()[:16]


def test_t5_tiny_concurrent_creation_keeps_one_copy(tiny_dirs):
    """A second creator finding the folder already made (the other process won the rename) leaves it intact."""
    a = tiny_dirs[0]
    before = (a / "model.safetensors").read_bytes()
    create(a, T5TinyOptions(path=str(a)))
    assert (a / "model.safetensors").read_bytes() == before
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_t5_tiny_default_path_is_under_the_cache(monkeypatch, tmp_path, tiny_dirs):
    monkeypatch.setenv("DFMKIT_CACHE", str(tmp_path))
    options = T5TinyOptions()
    folder = tmp_path / f"t5-tiny-{options.fingerprint()[:16]}"
    folder.parent.mkdir(exist_ok=True)
    import shutil

    shutil.copytree(tiny_dirs[0], folder)  # the default options' model, already made by the fixture
    assert ensure(options) == folder.resolve()


# ------------------------------------------------------------------------------------- cache


class CountingEncoder:
    """A stand-in text encoder that counts what reaches it."""

    dim = 4

    def __init__(self, identity="counting:v1"):
        self.identity = identity
        self.seen: list[str] = []

    def encode(self, texts):
        self.seen.extend(texts)
        return [torch.full((len(t) + 1, 4), float(len(t)), dtype=torch.bfloat16) for t in texts]


def test_cache_in_memory_and_within_a_call():
    inner = CountingEncoder()
    cache = EmbeddingCache(inner)
    assert isinstance(cache, TextEncoder) and cache.dim == 4 and cache.identity == inner.identity
    first = cache.encode(["a", "bb", "a"])
    assert inner.seen == ["a", "bb"]  # duplicates encoded once
    again = cache.encode(["bb", "ccc"])
    assert inner.seen == ["a", "bb", "ccc"]
    assert again[0] is first[1] and first[0] is first[2]
    assert (cache.hits, cache.misses) == (1, 3)


def test_cache_on_disk_survives_and_is_keyed_by_identity(tmp_path):
    cache = EmbeddingCache(CountingEncoder(), directory=tmp_path)
    states = cache.encode(["hello", "", "wörld ✓"])
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 3
    stored = load_file(str(files[0]))
    assert set(stored) == {"states"} and stored["states"].dtype == torch.bfloat16
    fresh = CountingEncoder()
    again = EmbeddingCache(fresh, directory=tmp_path).encode(["hello", "", "wörld ✓"])
    assert fresh.seen == []  # all from disk
    assert all(torch.equal(a, b) for a, b in zip(states, again))
    other = CountingEncoder("counting:v2")
    EmbeddingCache(other, directory=tmp_path).encode(["hello"])
    assert other.seen == ["hello"]  # another encoder never sees these states


def test_cache_ignores_torn_or_foreign_files(tmp_path):
    cache = EmbeddingCache(CountingEncoder(), directory=tmp_path, memory_items=0)
    cache.encode(["hello"])
    file = next(tmp_path.rglob("*.safetensors"))
    file.write_bytes(b"torn")
    inner = CountingEncoder()
    states = EmbeddingCache(inner, directory=tmp_path).encode(["hello"])
    assert inner.seen == ["hello"] and states[0].shape == (6, 4)
    assert not list(tmp_path.rglob("*.tmp"))


def test_cache_memory_is_bounded():
    inner = CountingEncoder()
    cache = EmbeddingCache(inner, memory_items=2)
    cache.encode(["a", "b", "c"])
    cache.encode(["a"])  # dropped (least recently used), encoded again
    cache.encode(["c"])  # kept
    assert inner.seen == ["a", "b", "c", "a"]


def test_cache_around_a_real_t5(t5_dir, tmp_path):
    enc = t5(t5_dir, dtype="fp32")
    direct = enc.encode(TEXTS)
    cached = EmbeddingCache(enc, directory=tmp_path).encode(TEXTS)
    assert all(torch.equal(a, b) for a, b in zip(direct, cached))
