"""The ``t5`` text encoder: a transformers ``T5EncoderModel`` and its tokenizer, frozen.

The reference conditions DiT on the last hidden states of ``google-t5/t5-11b`` (d_model 1024),
at most 512 tokens per caption. dfmkit does the same by default; smaller T5s are selectable by
``path`` (``google-t5/t5-small`` 512, ``t5-base`` 768, ``t5-large`` 1024, ``t5-3b`` 1024; the
backbone's cross-attention width follows :attr:`T5TextEncoder.dim`).

Where the files come from: ``path`` is a local folder (``save_pretrained`` layout: config.json,
model.safetensors or pytorch_model.bin, and spiece.model or tokenizer.json) or a hub repo id,
downloaded where the network allows into ``cache_dir`` (the hub's default cache when empty).
The model and tokenizer load on first use, so building the component is cheap; a local folder
that is missing or incomplete is reported at once, a hub repo that cannot be fetched on first use.

Lengths and truncation: each caption is tokenized with its end-of-sequence token. A caption of
more than ``max_length`` tokens keeps its first ``max_length - 1`` tokens plus the EOS token (what
transformers' ``truncation=True`` does) and a warning is logged; the states returned, and so the
length the data pipeline records, are the truncated ones. (The reference truncates the states to
512 but keeps the untruncated length; :meth:`T5TextEncoder.token_counts` gives the untruncated
counts for anyone who needs them.) Batching pads to the longest caption of a batch with an
attention mask, so a caption's states do not depend on its batch-mates (up to float rounding).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from dfmkit.components.tokenizers.base import MissingArtifactError
from dfmkit.devices import resolve_device
from dfmkit.errors import DfmkitError

log = logging.getLogger("dfmkit")

DEFAULT_T5 = "google-t5/t5-11b"
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
EXPECTED = "config.json, model.safetensors (or pytorch_model.bin) and tokenizer.json (or spiece.model)"


@attrs.define(kw_only=True)
class T5Options:
    """Frozen T5 encoder from transformers (google-t5/t5-11b by default), states at their true length."""

    path: str = DEFAULT_T5  # a local save_pretrained folder or a hub repo id
    cache_dir: str = ""  # Hugging Face cache for hub downloads; empty: the hub's default
    dtype: str = attrs.field(default="bf16", validator=attrs.validators.in_(["bf16", "fp32"]))
    max_length: int = attrs.field(default=512, validator=attrs.validators.ge(1))  # tokens, EOS included
    batch_size: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    device: str = attrs.field(default="auto", validator=attrs.validators.in_(["auto", "cpu", "cuda"]))


def looks_local(path: str) -> bool:
    """Whether ``path`` means a folder on this machine rather than a hub repo id ('org/name')."""
    return Path(path).expanduser().exists() or path.startswith(("/", ".", "~")) or path.count("/") > 1


def _hint(repo: str) -> str:
    return (
        f"Get them with `hf download {repo} --local-dir <folder>` (the hub repo {repo}; smaller T5s: "
        "google-t5/t5-small, google-t5/t5-base, google-t5/t5-large) and set text_encoder.path = '<folder>', "
        "or set text_encoder.path to the hub repo id where the network allows."
    )


def _check_folder(folder: Path, given: str) -> None:
    """Raise :class:`MissingArtifactError` unless ``folder`` holds a config, weights and a tokenizer."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        missing.append("model.safetensors (or pytorch_model.bin)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer.json (or spiece.model)")
    if missing:
        state = "does not exist" if not folder.exists() else f"lacks {', '.join(missing)}"
        raise MissingArtifactError(
            f"T5 text encoder {given!r}: the folder {folder} {state}. It needs {EXPECTED}. {_hint(DEFAULT_T5)}"
        )


class T5TextEncoder:
    """Frozen T5 encoder: ``encode(texts)`` gives each text's last hidden states ``[L_i, dim]``."""

    def __init__(
        self,
        path: str = DEFAULT_T5,
        *,
        cache_dir: str = "",
        dtype: str = "bf16",
        max_length: int = 512,
        batch_size: int = 8,
        device: str = "auto",
        identity: str | None = None,
    ):
        self.local = looks_local(path)
        self.path = str(Path(path).expanduser().resolve()) if self.local else path
        if self.local:
            _check_folder(Path(self.path), path)
        self.cache_dir = cache_dir or None
        self.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = resolve_device(device, "text_encoder.device")
        self.identity = identity or f"t5:{self.path}:{dtype}:max_length={max_length}"
        self._dim: int | None = None
        self._model: Any = None
        self._tokenizer: Any = None

    def __repr__(self) -> str:
        return f"T5TextEncoder({self.identity}, device={self.device})"

    def _from_pretrained(self, cls: Any, **kwargs: Any) -> Any:
        """``cls.from_pretrained(path)`` with one clear error when the files cannot be had."""
        try:
            return cls.from_pretrained(self.path, cache_dir=self.cache_dir, local_files_only=self.local, **kwargs)
        except Exception as exc:
            if self.local:
                raise DfmkitError(f"cannot load {cls.__name__} from {self.path}: {type(exc).__name__}: {exc}") from exc
            raise MissingArtifactError(
                f"T5 text encoder: could not get {self.path!r} from the Hugging Face hub "
                f"({type(exc).__name__}: {exc}). "
                f"The model needs {EXPECTED} from the hub repo {self.path}. {_hint(self.path)}"
            ) from exc

    @property
    def dim(self) -> int:
        """Hidden size (d_model) of the encoder: 1024 for t5-11b; read from config.json, no weights loaded."""
        if self._dim is None:
            from transformers import T5Config

            self._dim = int(self._from_pretrained(T5Config).d_model)
        return self._dim

    def load(self) -> T5TextEncoder:
        """Load the tokenizer and the weights now (``encode`` does it on first use)."""
        if self._model is None:
            from transformers import AutoTokenizer, T5EncoderModel

            self._tokenizer = self._from_pretrained(AutoTokenizer)
            model = self._from_pretrained(T5EncoderModel, dtype=self.dtype)
            self._model = model.to(self.device).eval().requires_grad_(False)
            self._dim = int(model.config.d_model)
        return self

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text before truncation, end-of-sequence token included."""
        return [len(ids) for ids in self._token_ids(texts)]

    def _token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode a list of texts, not a single string (wrap it: [text])")
        self.load()
        texts = list(texts)
        return self._tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text as the encoder sees them: truncated to ``max_length``, EOS kept last."""
        ids = self._token_ids(texts)
        eos, limit = self._tokenizer.eos_token_id, self.max_length
        longer = [len(seq) for seq in ids if len(seq) > limit]
        if longer:
            log.warning(
                "%d of %d texts have more than max_length=%d tokens (longest %d) and were truncated",
                len(longer), len(ids), limit, max(longer),
            )

        def truncate(seq: list[int]) -> list[int]:
            if len(seq) <= limit:
                return seq
            if limit > 1 and seq[-1] == eos:
                return seq[: limit - 1] + [eos]
            return seq[:limit]

        return [truncate(seq) for seq in ids]

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Each text's last hidden states ``[L_i, dim]`` at its true (possibly truncated) length, on the CPU."""
        ids = self.tokenize(texts)
        if not ids:
            return []
        pad = self._tokenizer.pad_token_id or 0
        out: list[torch.Tensor | None] = [None] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = len(ids[chunk[0]])
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            with torch.inference_mode():
                states = self._model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))
            hidden = states.last_hidden_state
            for row, i in enumerate(chunk):
                # copy=True: a slice must not keep the whole batch alive (caches hold these tensors)
                out[i] = hidden[row, : len(ids[i])].to(device="cpu", dtype=self.dtype, copy=True)
        return out  # type: ignore[return-value]


def build(options: T5Options, **_context) -> T5TextEncoder:
    return T5TextEncoder(
        options.path,
        cache_dir=options.cache_dir,
        dtype=options.dtype,
        max_length=options.max_length,
        batch_size=options.batch_size,
        device=options.device,
    )
