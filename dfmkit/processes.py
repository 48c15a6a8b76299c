"""Child processes die with the process that started them, so a killed run leaves nothing running behind it.

A run starts children: Energon's torch DataLoader workers and megatron-core's checkpoint writers (forked during a
save). When the run is killed with SIGKILL no Python code of it runs, and such children carried on: loader workers blocked
for good on queues that nobody reads, a save's writers went on writing, each a copy of the run's memory.

- :func:`children_die_with_this_process` registers an ``os.register_at_fork`` hook: every child forked from the
  main thread of this process asks Linux to kill it when this process dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``).
  The hook stays in the children, so their own children die with them in turn.
- :func:`die_with_parent` does the same from inside a child (a spawned process, fork and exec, runs no fork hooks:
  whatever starts one would pass it as the child's initializer). megatron's checkpoint writer used to spawn a
  Manager; it no longer does (:mod:`dfmkit.compat.megatron_checkpoint`).

multiprocessing's resource tracker needs neither: it exits once every process holding its pipe has gone.

Only children forked from the main thread are tied to their parent: Linux sends the signal when the forking
*thread* ends, so a child forked from a short-lived thread would die with that thread. Elsewhere than on Linux
these functions do nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_installed = False
_fork_parent: tuple[int, bool] = (0, False)  # (pid, forked from its main thread), set just before a fork


def die_with_parent(parent_pid: int) -> None:
    """Have this process killed when its parent (``parent_pid``) dies; if that already happened, die now."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not allowed here (some sandboxes): the child lives on as before
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _before_fork() -> None:
    global _fork_parent
    _fork_parent = (os.getpid(), threading.current_thread() is threading.main_thread())


def _after_fork_in_child() -> None:
    parent_pid, from_main_thread = _fork_parent
    if from_main_thread:
        die_with_parent(parent_pid)


def children_die_with_this_process() -> None:
    """From now on, every child forked from this process's main thread is killed when this process dies."""
    global _installed
    if _installed or sys.platform != "linux":
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _installed = True
