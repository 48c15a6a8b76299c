"""The ``t5-tiny`` text encoder: a small frozen T5 with seeded random weights, for offline use.

The offline quickstart and tests need a text encoder that works with no network. ``t5-tiny``
makes one on first use and afterwards loads it through exactly the same code as ``t5``
(:class:`~dfmkit.components.text_encoders.t5.T5TextEncoder`):

1. a SentencePiece BPE vocabulary trained in-process on ``corpus`` (default: the ten captions
   "a handwritten digit 0" .. "a handwritten digit 9" and a few generic English words; digits
   are split into single pieces and text is case-folded, so "A Handwritten Digit 3" is the same
   caption), turned into a transformers ``T5Tokenizer``;
2. a ``T5EncoderModel`` of ``num_layers`` layers of width ``d_model`` whose weights are drawn from
   NumPy's PCG64 generator seeded with ``seed`` (uniform, with T5's per-layer scales), which does
   not depend on transformers' or torch's initialisation code;
3. both saved with ``save_pretrained`` (plus ``spiece.model`` and ``dfmkit_t5_tiny.json``, the
   options it was built from) into a temporary folder next to ``path``, then renamed to ``path``
   in one step: two processes creating it at once both succeed and one of the two copies is kept.

Deterministic: the same options give the same folder on any machine with the same library
versions, hence the same embeddings up to the float rounding of the machine's matrix kernels.
The weights do not depend on library versions (they come from NumPy, not from torch or
transformers): a CPU machine (torch 2.13, transformers 5.24, sentencepiece 0.2.3) and a GPU
machine (torch 2.11, transformers 5.17) wrote byte-identical model.safetensors and gave the same
states for a digit caption to 1e-5; their config.json, spiece.model and tokenizer.json differed in
bytes (config.json records the transformers version; the other two were not compared further).

Different captions give clearly different states (the digit is a token of its own), which is
what the quickstart conditions on. ``path`` empty means ``$DFMKIT_CACHE/t5-tiny-<fingerprint>``
(default ``~/.cache/dfmkit``); an existing ``path`` built from other options is an error, never
silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from dfmkit.components.text_encoders.t5 import T5TextEncoder
from dfmkit.errors import DfmkitError

MARKER = "dfmkit_t5_tiny.json"
FORMAT = 1  # bump when the construction below changes what a given set of options produces

DEFAULT_CORPUS = tuple(f"a handwritten digit {i}" for i in range(10)) + (
    "a photo of a number",
    "an image of the figure",
    "black and white picture",
    "small large thin thick",
    "drawing on a background",
)


def default_cache_root() -> Path:
    return Path(os.environ.get("DFMKIT_CACHE") or Path.home() / ".cache" / "dfmkit").expanduser()


def _check_heads(instance: T5TinyOptions, attribute: Any, value: int) -> None:
    if value < 1 or instance.d_model % value:
        raise ValueError(f"'{attribute.name}' must divide d_model={instance.d_model} (got {value})")


@attrs.define(kw_only=True)
class T5TinyOptions:
    """Small frozen T5 with seeded random weights and a vocabulary trained on ``corpus``; works offline."""

    path: str = ""  # where it is created on first use; empty: $DFMKIT_CACHE/t5-tiny-<fingerprint>
    corpus: list[str] = attrs.Factory(lambda: list(DEFAULT_CORPUS))
    vocab_size: int = attrs.field(default=128, validator=attrs.validators.ge(8))  # an upper bound
    d_model: int = attrs.field(default=64, validator=attrs.validators.ge(8))
    num_layers: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    num_heads: int = attrs.field(default=4, validator=_check_heads)
    d_ff: int = attrs.field(default=128, validator=attrs.validators.ge(1))
    seed: int = 0
    dtype: str = attrs.field(default="fp32", validator=attrs.validators.in_(["bf16", "fp32"]))
    max_length: int = attrs.field(default=512, validator=attrs.validators.ge(1))
    batch_size: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    device: str = attrs.field(default="cpu", validator=attrs.validators.in_(["auto", "cpu", "cuda"]))

    def __attrs_post_init__(self) -> None:
        if not any(text.strip() for text in self.corpus):
            raise ValueError("'corpus' must hold at least one non-empty text")

    def recipe(self) -> dict[str, Any]:
        """What the weights and vocabulary are made from (not where they live or how they run)."""
        return {
            "format": FORMAT, "corpus": list(self.corpus), "vocab_size": self.vocab_size, "d_model": self.d_model,
            "num_layers": self.num_layers, "num_heads": self.num_heads, "d_ff": self.d_ff, "seed": self.seed,
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.recipe(), sort_keys=True).encode()).hexdigest()


def _train_vocabulary(corpus: list[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model (pad 0, eos 1, unk 2, as T5 has them) trained in memory."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([text for text in corpus if text.strip()]),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not fill vocab_size
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc_cf",  # NFKC + case folding
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _seeded_weights(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter from PCG64(seed) in name order: uniform with T5's scale for its role."""
    config = model.config
    rng = np.random.Generator(np.random.PCG64(seed))
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):  # tied embeddings appear once
            if "layer_norm" in name:
                param.fill_(1.0)
                continue
            if "shared" in name or "embed_tokens" in name:
                std = 1.0
            elif "relative_attention_bias" in name:
                std = config.d_model**-0.5
            elif name.endswith(".q.weight"):  # T5 folds attention's 1/sqrt(d) into q
                std = (config.d_model * config.d_kv) ** -0.5
            else:
                std = param.shape[1] ** -0.5  # nn.Linear [out, in]: 1/sqrt(fan_in)
            bound = std * 3**0.5
            values = rng.uniform(-bound, bound, size=tuple(param.shape)).astype(np.float32)
            param.copy_(torch.from_numpy(values))


def create(folder: Path, options: T5TinyOptions) -> None:
    """Write the tiny T5 (tokenizer, weights, marker) into ``folder`` atomically."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        (staging / "spiece.model").write_bytes(_train_vocabulary(options.corpus, options.vocab_size))
        tokenizer = T5Tokenizer.from_pretrained(str(staging), extra_ids=0)
        tokenizer.save_pretrained(str(staging))
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=options.d_model,
            d_kv=options.d_model // options.num_heads,
            d_ff=options.d_ff,
            num_layers=options.num_layers,
            num_heads=options.num_heads,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        model = T5EncoderModel(config)
        _seeded_weights(model, options.seed)
        model.save_pretrained(str(staging))
        marker = {"fingerprint": options.fingerprint(), "recipe": options.recipe()}
        (staging / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        for file in staging.iterdir():  # readable by all, like any shared cache (mkdtemp makes it private)
            file.chmod(0o644)
        staging.chmod(0o755)
        try:
            os.rename(staging, folder)  # atomic; fails if another process already put a folder there
        except OSError:
            if not (folder / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure(options: T5TinyOptions) -> Path:
    """The folder of the tiny T5 these options describe, created on first use."""
    fingerprint = options.fingerprint()
    folder = Path(options.path).expanduser() if options.path else default_cache_root() / f"t5-tiny-{fingerprint[:16]}"
    folder = folder.resolve()
    if not (folder / MARKER).is_file():
        if folder.exists() and any(folder.iterdir()):
            raise DfmkitError(
                f"text_encoder.path {folder} exists but holds no {MARKER}: it is not a t5-tiny folder. "
                "Point text_encoder.path at an empty or missing folder (or leave it empty)."
            )
        create(folder, options)
    found = json.loads((folder / MARKER).read_text()).get("fingerprint")
    if found != fingerprint:
        raise DfmkitError(
            f"the t5-tiny in {folder} was built from other options (fingerprint {str(found)[:16]}, "
            f"these options give {fingerprint[:16]}); delete that folder or choose another text_encoder.path"
        )
    return folder


def build(options: T5TinyOptions, **_context) -> T5TextEncoder:
    folder = ensure(options)
    return T5TextEncoder(
        str(folder),
        dtype=options.dtype,
        max_length=options.max_length,
        batch_size=options.batch_size,
        device=options.device,
        identity=f"t5-tiny:{options.fingerprint()[:16]}:{options.dtype}:max_length={options.max_length}",
    )
