"""Counting the samples that are skipped, by reason: each bad sample once.

Bad data never stops a run: a sample that cannot be read, decoded or used is skipped, counted under one of
:data:`REASONS`, and logged (the first few of each reason in full, then every 1000th, so a badly broken dataset does
not flood the log).

A skipped sample is counted once, by its identity, however often it is met: the loader's samples are known by their
index in the split (Energon's sample index; the messages name the shard and the sample), a shard lost as a whole by
its name, with the number of samples it held. With ``repeat`` the loader reads the data again and again, and a
restored loader reads again what it had read ahead before the save: neither counts a bad sample twice. So the counts
say how many samples of the data read so far are bad, and a run resumed at some step has the same counts as one
that was not.

The loader's worker processes count in their own copies. The task encoder hands on the records that are new since its
last pack with that pack (:meth:`SkipCounter.take_new`), and the loader adds them to its own counter as it delivers
the pack (:meth:`SkipCounter.add`): the counts follow the batches delivered, not how far the workers read ahead.
The records are part of the loader's saved state (:meth:`SkipCounter.state`).

A loader process none of whose samples can be used would look for one forever: :meth:`SkipCounter.check_progress`
stops it (:class:`NoUsableSamples`) once every sample of its part of the data has been skipped.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from dfmkit.data import DataError

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

#: A record: (identity, reason, samples). The identity is an int (a sample index) or a str (a shard, a source item).
Record = tuple[Hashable, str, int]


class NoUsableSamples(DataError):
    """Every sample of a loader process's part of the data was skipped: it would wait for a usable one forever."""

    @classmethod
    def message_of(cls, exc: BaseException) -> str:
        """The message of ``exc``, raised in a loader worker: torch raises it again in the main process with the
        worker's traceback as its text, whose last line holds the message."""
        text, marker = str(exc), f"{cls.__name__}: "
        lines = [line for line in text.splitlines() if marker in line]
        return lines[-1].split(marker, 1)[1] if lines else text


class SkipCounter:
    """Skipped samples by reason, each counted once by its identity."""

    def __init__(self, initial: Mapping[str, int] | None = None):
        self._records: dict[Hashable, tuple[str, int]] = {}
        self._counts: dict[str, int] = {}
        self._new: list[Record] = []
        self._logged: dict[str, int] = {}
        # Whether this process is stuck: the identities it met as skipped, until it meets a usable sample.
        self._met: set[Hashable] | None = set()
        self._smallest: tuple[int, str] | None = None  # the smallest too-long sample met: (size, description)
        if initial:
            self.load(initial)

    # -- counting --------------------------------------------------------------------------------

    def _record(self, identity: Hashable, reason: str, n: int) -> bool:
        if identity in self._records:
            return False
        self._records[identity] = (reason, n)
        self._counts[reason] = self._counts.get(reason, 0) + n
        return True

    def count(self, reason: str, identity: Hashable, detail: str = "", *, where: str = "", n: int = 1,
              size: int | None = None) -> bool:
        """Count sample ``identity`` (``n`` samples for a whole shard) as skipped for ``reason``, unless it was
        counted before; log it. ``where`` names it in messages (default: the identity). ``size`` orders too-long
        samples (their tokens). Returns whether it was new."""
        if reason not in REASONS:
            detail = f"({reason}) {detail}"
            reason = "error"
        where = where or str(identity)
        if self._met is not None:
            self._met.add(identity)
            if size is not None and reason == "too_long" and (self._smallest is None or size < self._smallest[0]):
                self._smallest = (size, f"{where}: {detail}")
        if not self._record(identity, reason, n):
            return False
        self._new.append((identity, reason, n))
        seen = self._logged.get(reason, 0) + 1
        self._logged[reason] = seen
        total = self._counts[reason]
        if seen <= LOG_FIRST or total % LOG_EVERY < n:
            what = f"sample {where!r}" if n == 1 else f"{n} samples of {where!r}"
            more = "" if seen < LOG_FIRST else f" (further '{reason}' skips are logged every {LOG_EVERY})"
            log.warning("skipped %s: %s%s [%s: %d so far]%s", what, reason, f": {detail}" if detail else "",
                        reason, total, more)
        else:
            log.debug("skipped %s: %s: %s", where, reason, detail)
        return True

    def take_new(self) -> list[Record]:
        """The records counted since the last call (for a pack to carry them to the loader's counter)."""
        new, self._new = self._new, []
        return new

    def add(self, records: Iterable[Record]) -> None:
        """Add records counted elsewhere (by a loader worker); those known already change nothing."""
        for identity, reason, n in records:
            self._record(identity, reason, int(n))

    # -- a process that finds nothing usable -----------------------------------------------------

    def usable(self) -> None:
        """A sample was usable: this process is not stuck (and stops keeping track)."""
        self._met = None

    def met(self, identity: Hashable) -> None:
        """A sample was not usable without being a bad sample (left out by the dataset's own excludes)."""
        if self._met is not None:
            self._met.add(identity)

    def check_progress(self, part_samples: int, part: str) -> None:
        """Raise :class:`NoUsableSamples` if every one of the ``part_samples`` samples of ``part`` (what this
        process reads) was skipped and none was usable."""
        if self._met is None or part_samples <= 0 or len(self._met) < part_samples:
            return
        reasons: dict[str, int] = {}
        for identity in self._met:
            reason = self._records.get(identity, ("excluded by the dataset", 1))[0]
            reasons[reason] = reasons.get(reason, 0) + 1
        if set(reasons) == {"too_long"} and self._smallest is not None:
            size, smallest = self._smallest
            raise NoUsableSamples(f"no sample of {part} fits a pack: even the smallest, {smallest}; raise "
                                  f"data.seq_length to at least {size}")
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        raise NoUsableSamples(f"every sample of {part} is skipped ({counts}), so no batch can be made; "
                              "the warnings above say why each was skipped")

    # -- counts and state ------------------------------------------------------------------------

    def as_dict(self) -> dict[str, int]:
        """Every reason with a non-zero count."""
        return {name: self._counts[name] for name in REASONS if self._counts.get(name)}

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def report(self) -> str:
        """One line for logs: '3 skipped (nonfinite 2, too_long 1)' or 'no samples skipped'."""
        return report(self.as_dict())

    @property
    def recorded(self) -> int:
        """How many records there are (:meth:`state` of that many gives the counter as it is now)."""
        return len(self._records)

    def state(self, records: int | None = None) -> dict[str, Any]:
        """The records (the first ``records`` made, or all) as JSON data: sample indices as [start, stop) ranges by
        reason, named records by name."""
        indices: dict[str, list[int]] = {}
        named: dict[str, list[Any]] = {}
        for identity, (reason, n) in itertools.islice(self._records.items(), records):
            if isinstance(identity, int) and n == 1:
                indices.setdefault(reason, []).append(identity)
            else:
                named[str(identity)] = [reason, n]
        return {"samples": {reason: _ranges(values) for reason, values in indices.items()}, "named": named}

    def load(self, state: Mapping[str, Any]) -> None:
        """Replace the records by a :meth:`state` (or by plain counts by reason, as older loader states hold: those
        samples are not known one by one, so meeting them again counts them again)."""
        self._records.clear()
        self._counts.clear()
        self._new.clear()
        if "samples" in state or "named" in state:
            for reason, ranges in (state.get("samples") or {}).items():
                for start, stop in ranges:
                    for index in range(int(start), int(stop)):
                        self._record(index, reason, 1)
            for name, (reason, n) in (state.get("named") or {}).items():
                self._record(name, reason, int(n))
        else:
            for reason, n in state.items():
                if int(n):
                    self._record(f"counted before: {reason}", reason if reason in REASONS else "error", int(n))

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


def report(counts: Mapping[str, int]) -> str:
    """Counts by reason in one line: '3 skipped (nonfinite 2, too_long 1)' or 'no samples skipped'."""
    counts = {name: int(n) for name, n in counts.items() if int(n)}
    if not counts:
        return "no samples skipped"
    parts = ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{sum(counts.values())} skipped ({parts})"


def _ranges(values: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for value in sorted(values):
        if out and out[-1][1] == value:
            out[-1][1] = value + 1
        else:
            out.append([value, value + 1])
    return out


class SkipError(Exception):
    """Raised by checks that found a bad sample; carries the reason for :class:`SkipCounter` (and, for a too-long
    sample, its size in tokens)."""

    def __init__(self, reason: str, detail: str = "", size: int | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.size = size
