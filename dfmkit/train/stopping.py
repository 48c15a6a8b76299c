"""Stopping a run on SIGTERM or SIGINT (what ``timeout``, schedulers and torchrun send, and Ctrl-C) within seconds,
wherever it is: the signal handlers, the wait for data they cut short, and the ranks' agreement to save.

The rule (:class:`dfmkit.train.loop.Trainer` follows it):

- A signal that comes while a step computes lets the step finish; every rank learns of it from the step's
  all-reduce, and they save the state after that step together.
- A signal that comes while a rank waits for the batches of its next step stops the wait: at once in a run of one
  process; with several, after :data:`DATA_GRACE_S` more seconds without the batches, so that a rank whose data is
  only slow still joins the step another rank has begun (the stop is then as above). The rank goes back to the
  start of that step (the loader's position there: no batch of the unfinished step counts as read), and the ranks
  save the state of the last step they all completed, if every rank stopped so within :data:`AGREEMENT_S` seconds
  (:func:`all_ranks_stopped`). Otherwise some rank is inside the step, waiting for this one, and cannot save: no
  rank saves, and the run ends with :class:`StoppedWithoutSaving`, which names the last complete checkpoint.
- A save waits for the data loader's worker processes to say where they are (between two samples); after a stop
  signal at most :data:`~dfmkit.data.loader.WORKER_ANSWER_S` seconds: a worker stuck in a read ends the run without
  a save (:class:`StoppedWithoutSaving`).

A second signal changes nothing: a Ctrl-C under torchrun reaches each rank twice (from the terminal, and passed on).
"""

from __future__ import annotations

import contextlib
import datetime
import signal
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from dfmkit.errors import DfmkitError

#: Seconds a rank of a run of several processes still waits for its batches after a stop signal.
DATA_GRACE_S = 3.0
#: Seconds the ranks that stopped waiting for data wait for each other before they give up the save.
AGREEMENT_S = 5.0


class StoppedWithoutSaving(DfmkitError):
    """A stop signal ended the run where it could not save; the message names the last complete checkpoint."""


class DataWaitInterrupted(BaseException):
    """A stop signal cut short a wait for data. Not an Exception: data loaders that count any Exception of a sample
    as a bad sample let it through."""


class StopSignals:
    """SIGTERM and SIGINT handlers for the length of a run (``with``): they note the first signal (``received``), and
    cut short a wait for data (:meth:`waiting_for_data`), at once or after ``grace`` seconds."""

    def __init__(self, grace: float = 0.0):
        self.grace = grace
        self.received: int | None = None
        self._waiting: float | None = None  # the grace of the wait under way
        self._armed = False  # the grace timer runs
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_grace_over)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._disarm()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received = signum
            if self._waiting is not None:
                self._stop_waiting(self._waiting)

    def _stop_waiting(self, grace: float) -> None:
        if grace <= 0:
            raise DataWaitInterrupted
        self._armed = True
        signal.setitimer(signal.ITIMER_REAL, grace)  # then _on_grace_over

    def _disarm(self) -> None:
        if self._armed:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _on_grace_over(self, _signum: int, _frame: Any) -> None:
        if self._waiting is not None:
            raise DataWaitInterrupted

    @contextlib.contextmanager
    def waiting_for_data(self, grace: float | None = None) -> Iterator[None]:
        """The body waits for data: a stop signal (one that came before it too) raises :class:`DataWaitInterrupted`
        in it, at once or after ``grace`` seconds (default: the run's)."""
        self._waiting = self.grace if grace is None else grace
        try:
            if self.received is not None:
                self._stop_waiting(self._waiting)
            yield
        finally:
            self._waiting = None
            self._disarm()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "none"


_stop_groups: dict[Any, Any] = {}  # the default group -> its gloo twin


def stop_group() -> Any:
    """A gloo group of every rank, for :func:`all_ranks_stopped` (every rank makes it, at start; once a process), or
    None in a run of one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    world = dist.group.WORLD
    if world not in _stop_groups:
        _stop_groups[world] = dist.new_group(backend="gloo")
    return _stop_groups[world]


def all_ranks_stopped(group: Any, timeout: float = AGREEMENT_S) -> bool:
    """Whether every rank of ``group`` (:func:`stop_group`) calls this within ``timeout`` seconds (a rank inside a
    step, waiting for one that stopped, does not)."""
    if group is None:
        return True
    try:
        dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True)
    except RuntimeError:
        return False
    return True
