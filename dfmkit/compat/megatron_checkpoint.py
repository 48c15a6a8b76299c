"""megatron-core's checkpoint writer keeps the results of a synchronous save in this process: no spawned Manager.

Checked on megatron-core 0.16.1.

megatron's ``FileSystemWriterAsync`` (the writer of torch_dist saves) takes its results queue from the module's
private ``_get_write_results_queue``, which on the first save spawns a ``multiprocessing`` Manager to serve the
queue and keeps it for the life of the process: the queue has to cross processes when a save runs asynchronously.
dfmkit saves synchronously (``dist_checkpointing.save``), and then the queue never leaves this process:
``write_preloaded_data_multiproc`` puts the writers' results into it and ``retrieve_write_results`` takes them
out with ``get_nowait``, both here. The spawned Manager only cost a process that

- started a fresh interpreter that imports the main module again: a training script without
  ``if __name__ == "__main__":`` ran its training again inside it, and the first save failed;
- outlived a run killed with SIGKILL.

:func:`synchronous_save_results` replaces the function by one that hands out an in-process ``queue.Queue``.
"""

from __future__ import annotations

import inspect
import queue

from dfmkit.compat import missing_attributes, replace, shipped

CHECKED_ON = {"megatron-core": "0.16.1"}

_results: queue.Queue = queue.Queue()


def _results_queue() -> queue.Queue:
    return _results


def synchronous_save_results() -> None:
    """Have megatron's checkpoint writer keep a synchronous save's results in this process (no Manager process)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if shipped(filesystem_async, "_get_write_results_queue") is filesystem_async._get_write_results_queue:
        replace(filesystem_async, "_get_write_results_queue", _results_queue)


def check() -> list[str]:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    patch = "synchronous_save_results"
    problems = missing_attributes(patch, filesystem_async, "_get_write_results_queue", "FileSystemWriterAsync")
    if problems:
        return problems
    writer = filesystem_async.FileSystemWriterAsync
    if "_get_write_results_queue()" not in inspect.getsource(writer.prepare_write_data):
        problems.append(f"{patch}: FileSystemWriterAsync.prepare_write_data no longer takes its queue from "
                        "_get_write_results_queue()")
    if "get_nowait()" not in inspect.getsource(writer.retrieve_write_results):
        problems.append(f"{patch}: FileSystemWriterAsync.retrieve_write_results no longer reads the queue with "
                        "get_nowait() (a queue filled by this process may no longer do)")
    return problems
