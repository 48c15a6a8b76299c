"""megatron-core's checkpoint writer: the Manager process behind its results queue dies with the run.

Checked on megatron-core 0.16.1.

- :func:`results_queue_dies_with_the_run`: megatron's ``FileSystemWriterAsync`` (the writer of torch_dist saves)
  takes its results queue from the module's private ``_get_write_results_queue``, which on the first save spawns a
  ``multiprocessing`` Manager to serve it and keeps it in the private global ``_results_queue`` for the life of the
  process. A spawned process runs no fork hooks, so :func:`dfmkit.processes.children_die_with_this_process` does not
  reach it, and the Manager outlived a run killed with SIGKILL. The replacement spawns the same kind of Manager with
  :func:`dfmkit.processes.die_with_parent` as its initializer and hands out the same kind of queue.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from multiprocessing.managers import SyncManager
from typing import Any

from dfmkit.compat import missing_attributes, replace, shipped
from dfmkit.processes import die_with_parent

CHECKED_ON = {"megatron-core": "0.16.1"}


def _results_queue() -> Any:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        # The kernel ties a child to the thread that started it: only the main thread's outlives a save.
        if threading.current_thread() is threading.main_thread():
            manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        else:
            manager.start()
        filesystem_async._results_queue = manager.Queue()  # the queue's proxy keeps the manager alive
    return filesystem_async._results_queue


def results_queue_dies_with_the_run() -> None:
    """Have megatron's checkpoint writer serve its results queue from a Manager that dies with this process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if shipped(filesystem_async, "_get_write_results_queue") is not filesystem_async._get_write_results_queue:
        return  # already replaced
    replace(filesystem_async, "_get_write_results_queue", _results_queue)


def check() -> list[str]:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    patch = "results_queue_dies_with_the_run"
    problems = missing_attributes(patch, filesystem_async, "_get_write_results_queue", "_results_queue",
                                  "FileSystemWriterAsync")
    if not problems:
        import inspect

        source = inspect.getsource(filesystem_async.FileSystemWriterAsync)
        if "_get_write_results_queue()" not in source:
            problems.append(f"{patch}: {filesystem_async.__name__}.FileSystemWriterAsync no longer takes its queue "
                            "from _get_write_results_queue()")
    return problems
