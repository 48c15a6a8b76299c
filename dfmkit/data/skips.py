"""Counting the samples that are skipped, by reason.

Bad data never stops a run: a sample that cannot be read, decoded or used is skipped, counted
under one of :data:`REASONS`, and logged (the first few of each reason in full, then every
1000th, so a badly broken dataset does not flood the log).

The counts live in shared memory created by the process that builds the loader, so the
Energon worker processes (forked from it) add to the same numbers the training loop reads.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("dfmkit.data")

#: Why a sample was skipped.
REASONS: dict[str, str] = {
    "unreadable": "the tar shard could not be read at this sample (truncated or damaged file)",
    "missing_member": "a member of the sample (latent, text or json) is missing",
    "undecodable": "a member could not be decoded (garbage bytes, bad safetensors/npy/json)",
    "nonfinite": "the latent holds NaN or Inf, or values beyond the configured bound",
    "too_long": "the sample has more latent tokens than one packed sequence holds (data.seq_length)",
    "bad_latent": "the latent has the wrong rank, channel count, or does not divide into patches",
    "bad_text": "the text-encoder states have the wrong shape or width, or are not finite",
    "no_caption": "the source item has no caption",
    "unreadable_source": "the source image or video could not be read",
    "error": "any other error while loading the sample (see the log)",
}

#: Full messages for the first this many skips of each reason (per process), then every 1000th.
LOG_FIRST = 10
LOG_EVERY = 1000


class SkipCounter:
    """Counts of skipped samples by reason, shared with forked worker processes."""

    def __init__(self, initial: Mapping[str, int] | None = None):
        self._names = list(REASONS)
        self._index = {name: i for i, name in enumerate(self._names)}
        # Created before the workers fork, so they inherit (and write to) the same memory.
        self._shared = multiprocessing.Array(ctypes.c_int64, len(self._names), lock=True)
        self._logged: dict[str, int] = {}
        if initial:
            self.load(initial)

    def count(self, reason: str, key: str = "", detail: str = "", n: int = 1) -> int:
        """Count ``n`` skips (of one sample, or of a whole lost shard); log; return the new count for ``reason``."""
        if reason not in self._index:
            detail = f"({reason}) {detail}"
            reason = "error"
        with self._shared.get_lock():
            self._shared[self._index[reason]] += n
            total = self._shared[self._index[reason]]
        seen = self._logged.get(reason, 0) + 1
        self._logged[reason] = seen
        if seen <= LOG_FIRST or total % LOG_EVERY < n:
            what = (f"sample {key!r}" if n == 1 else f"{n} samples of {key!r}") if key else f"{n} sample(s)"
            more = "" if seen < LOG_FIRST else f" (further '{reason}' skips are logged every {LOG_EVERY})"
            log.warning("skipped %s: %s%s [%s: %d so far]%s", what, reason, f": {detail}" if detail else "",
                        reason, total, more)
        else:
            log.debug("skipped sample %r: %s: %s", key, reason, detail)
        return total

    def as_dict(self) -> dict[str, int]:
        """Every reason with a non-zero count."""
        with self._shared.get_lock():
            values = list(self._shared)
        return {name: int(v) for name, v in zip(self._names, values) if v}

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def load(self, counts: Mapping[str, Any]) -> None:
        """Set the counts (for example from a saved loader state); unknown reasons count as 'error'."""
        values = [0] * len(self._names)
        for name, value in counts.items():
            values[self._index.get(name, self._index["error"])] += int(value)
        with self._shared.get_lock():
            for i, value in enumerate(values):
                self._shared[i] = value

    def report(self) -> str:
        """One line for logs: '3 skipped (nonfinite 2, too_long 1)' or 'no samples skipped'."""
        counts = self.as_dict()
        if not counts:
            return "no samples skipped"
        parts = ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"{sum(counts.values())} skipped ({parts})"

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"

    def __getstate__(self) -> dict[str, Any]:
        # Only fork shares the memory; a copy made any other way keeps its own counts.
        return {"counts": self.as_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["counts"])


class SkipError(Exception):
    """Raised by checks that found a bad sample; carries the reason for :class:`SkipCounter`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
