"""An embeddings cache: text states keyed by ``(encoder.identity, text)``, in memory and optionally on disk.

:class:`EmbeddingCache` wraps a text encoder and is one itself (same ``dim``, ``identity`` and
``encode``), so callers use it in place of the encoder::

    encoder = EmbeddingCache(job.components["text_encoder"].build(recipe=recipe), directory=cache_dir)
    states = encoder.encode(captions)        # only the texts not seen before reach the model

- Memory: the last ``memory_items`` texts (least recently used dropped first).
- Disk (``directory`` set): one safetensors file per text (never pickle), at
  ``<directory>/<sha256(identity)[:16]>/<key[:2]>/<key>.safetensors`` with
  ``key = sha256(identity + NUL + text)``; the file's metadata holds the identity and the text
  and is checked on read, so a stale or foreign file is re-encoded, never trusted. Files are
  written to a temporary name and renamed, so concurrent writers (data-parallel ranks of
  ``prepare``) never leave a torn file.
- Within one ``encode`` call repeated texts are encoded once; the encoder sees the misses as one
  batched call.

Intended use by ``prepare`` and validation (their modules do the wrapping): ``prepare`` wraps the
recipe's text encoder in a cache whose directory lives beside the output shards, so repeated
captions (class-name captions such as the butterfly species, the ten digit captions) are encoded
once and a re-run after an interruption encodes nothing twice; validation encodes its prompts
through a cache (in memory, plus on disk when the run has a cache directory), so each prompt is
encoded once per run, or once ever, and the large encoder need not stay loaded. A different model,
dtype or max length changes ``identity`` and so every key: the cache never mixes encoders.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dfmkit.components.text_encoders.base import TextEncoder


class EmbeddingCache:
    """A :class:`TextEncoder` that remembers what ``encoder`` returned for each text."""

    def __init__(self, encoder: TextEncoder, directory: str | os.PathLike[str] | None = None, memory_items: int = 4096):
        self.encoder = encoder
        self.identity = encoder.identity
        self.memory_items = memory_items
        self.directory = None
        if directory is not None:
            digest = hashlib.sha256(self.identity.encode()).hexdigest()[:16]
            self.directory = Path(directory).expanduser() / digest
            self.directory.mkdir(parents=True, exist_ok=True)
            note = self.directory / "identity.txt"
            if not note.exists():
                note.write_text(self.identity + "\n")
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0  # texts answered from memory or disk
        self.misses = 0  # texts that reached the encoder

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.identity}\0{text}".encode()).hexdigest()

    def _file(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.safetensors"

    def _remember(self, key: str, states: torch.Tensor) -> None:
        if self.memory_items <= 0:
            return
        self._memory[key] = states
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)

    def _read(self, key: str, text: str) -> torch.Tensor | None:
        if self.directory is None:
            return None
        file = self._file(key)
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("identity") != self.identity or meta.get("text") != text:
                    return None
                return f.get_tensor("states")
        except Exception:  # missing, torn or foreign file: encode again
            return None

    def _write(self, key: str, text: str, states: torch.Tensor) -> None:
        if self.directory is None:
            return
        file = self._file(key)
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:8]}.", suffix=".tmp", dir=file.parent)
        os.close(fd)
        try:
            save_file({"states": states.contiguous()}, tmp, metadata={"identity": self.identity, "text": text})
            os.replace(tmp, file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """States of each text: from memory, then disk, then the encoder (one batched call for the misses)."""
        if isinstance(texts, str):
            raise TypeError("encode a list of texts, not a single string (wrap it: [text])")
        texts = list(texts)
        keys = [self.key(text) for text in texts]
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, str] = {}  # key -> text, first occurrence order
        for key, text in zip(keys, texts):
            if key in found or key in missing:
                continue
            states = self._memory.get(key)
            if states is None:
                states = self._read(key, text)
            if states is None:
                missing[key] = text
            else:
                found[key] = states
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            encoded = self.encoder.encode(list(missing.values()))
            for (key, text), states in zip(missing.items(), encoded):
                self._write(key, text, states)
                found[key] = states
        for key in dict.fromkeys(keys):
            self._remember(key, found[key])
        return [found[key] for key in keys]
