"""TensorBoard's event-writer thread, whose failed write (a full disk) Python would print as a traceback.

Checked on tensorboard 2.21.0 (under torch 2.13.0's ``torch.utils.tensorboard``).

TensorBoard writes events on a thread of its own (``event_file_writer._AsyncWriterThread``). When a write fails, the
thread keeps the exception for the next write of the training loop to raise, and raises it as well, so Python's
``threading.excepthook`` prints its traceback. :class:`dfmkit.train.logger.MetricsLogger` turns the loop's copy into
one warning and trains on without TensorBoard; :func:`quiet_writer_thread_errors` keeps the thread's copy off the
terminal. Only an OSError of that thread is kept quiet; everything else goes to the hook that was there.
"""

from __future__ import annotations

import threading

from dfmkit.compat import missing_attributes

CHECKED_ON = {"tensorboard": "2.21.0", "torch": "2.13.0"}

_quiet = False


def quiet_writer_thread_errors() -> None:
    """From now on, an OSError that ends TensorBoard's writer thread prints nothing (installed once per process)."""
    global _quiet
    if _quiet:
        return
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook

    def hook(args) -> None:
        if isinstance(args.thread, _AsyncWriterThread) and issubclass(args.exc_type, OSError):
            return  # the loop's next write raises it again, and the logger warns once
        previous(args)

    threading.excepthook = hook
    _quiet = True


def check() -> list[str]:
    from tensorboard.summary.writer import event_file_writer

    problems = missing_attributes("quiet_writer_thread_errors", event_file_writer, "_AsyncWriterThread", "_AsyncWriter")
    if problems:
        return problems
    if not issubclass(event_file_writer._AsyncWriterThread, threading.Thread):
        return ["quiet_writer_thread_errors: tensorboard's _AsyncWriterThread is no longer a threading.Thread"]
    # the loop's write must raise what the thread met, or quieting the thread would hide the failure
    return missing_attributes("quiet_writer_thread_errors", event_file_writer._AsyncWriter, "_check_worker_status")
