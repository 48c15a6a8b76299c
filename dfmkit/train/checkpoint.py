"""Checkpoints: megatron-core dist_checkpointing (torch_dist), written aside and published atomically.

Layout of ``checkpoint.dir``::

    iter_0000200/            a complete checkpoint (megatron's files + dfmkit.json + rank_*.json)
    iter_0000400/
    latest                   text: the iteration of the newest complete checkpoint
    .tmp_iter_0000600/       a save in progress (or one killed mid-way: ignored, cleared next save)

A save writes everything into the ``.tmp_`` folder, then ``dfmkit.json`` (the completeness
marker), then renames the folder and replaces ``latest`` with ``os.replace``. A crash at any
point leaves ``latest`` naming a checkpoint that loads. A write that fails (a full disk) fails the save on every
rank with a :class:`CheckpointError` that says why and names the checkpoint still there; the ``.tmp_`` folder is
removed. Per-rank state that is not a tensor (RNG states, the loader position) goes to ``rank_<r>.json``, never
through pickle.

Loading runs no code from the checkpoint (:func:`load_sharded`): ``common.pt`` is read weights-only,
torch.distributed.checkpoint's ``.metadata`` with an unpickler that admits only the classes such a file is made of,
and the byte entries of the ``.distcp`` files weights-only (:func:`dfmkit.compat.torch_dcp.restricted_unpickling`);
the loader state in ``rank_*.json`` builds only plain values and Energon's state classes
(:func:`dfmkit.data.loader.state_from_json`); module extra state that TransformerEngine would unpickle is refused.
A checkpoint that holds anything else is refused, naming the file, before any of it reaches the model or loader.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from dfmkit.compat.megatron_checkpoint import synchronous_save_results
from dfmkit.compat.torch_dcp import MetadataUnpickler, load_weights_only, restricted_unpickling
from dfmkit.data import DataError
from dfmkit.data.loader import state_from_json
from dfmkit.errors import CheckpointError

log = logging.getLogger("dfmkit")

MARKER = "dfmkit.json"
LATEST = "latest"
_ITER = re.compile(r"^iter_(\d{7})$")


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def complete_iterations(root: Path) -> list[int]:
    """Iterations of the complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _ITER.match(child.name)
        if match and (child / MARKER).is_file():
            found.append(int(match.group(1)))
    return sorted(found)


def find_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """The checkpoint to load from ``path``: itself if it is one, else the newest complete one in it."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        candidate = iteration_dir(path, int(latest.read_text().strip()))
        if (candidate / MARKER).is_file():
            return candidate
    iterations = complete_iterations(path)
    return iteration_dir(path, iterations[-1]) if iterations else None


def read_marker(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{checkpoint} is not a complete dfmkit checkpoint ({exc}); "
                              f"point at a folder containing {MARKER}") from None


def save_checkpoint(
    root: str | os.PathLike[str],
    iteration: int,
    sharded_state_dict: dict[str, Any],
    marker: dict[str, Any],
    rank_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Save on every rank; returns the published folder. ``marker`` is written by rank 0 only.

    A write that fails on any rank (a full disk, a quota, a file system error) fails the save on every rank alike:
    the unfinished ``.tmp_`` folder is removed and a :class:`CheckpointError` says why, how much room the file system
    has, and which complete checkpoint is still there to resume from."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = root / f".tmp_{final.name}"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_iter_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()

    def write() -> None:
        synchronous_save_results()
        dist_checkpointing.save(sharded_state_dict, str(tmp))
        _write_atomic(tmp / f"rank_{_rank():05d}.json", json.dumps(rank_state))

    def publish() -> None:
        _write_atomic(tmp / MARKER, json.dumps({**marker, "iteration": iteration}, indent=2))
        if final.exists():  # a re-save of the same iteration replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        try:
            _write_atomic(root / LATEST, f"{iteration}\n")
        except OSError as exc:  # the checkpoint is complete; without `latest` the newest complete one is found
            (root / LATEST).unlink(missing_ok=True)
            log.warning("%s is complete, but %s could not be updated (%s); removed it: a resume finds the newest "
                        "complete checkpoint", final, root / LATEST, exc)

    for action, everywhere in ((prepare, False), (write, True), (publish, False)):
        failure = _failure_on_any_rank(action, everywhere)
        if failure is not None:
            message = _save_failed(root, iteration, tmp, failure)  # with the room the failed write left
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(message)
    if _rank() == 0:
        for old in complete_iterations(root)[:-keep_last]:
            shutil.rmtree(iteration_dir(root, old), ignore_errors=True)
    _barrier()
    return final


#: Free bytes under which a file system where a write failed counts as full (the failed write left it about empty).
_ALMOST_FULL = 1 << 20


def _failure_on_any_rank(action: Callable[[], None], everywhere: bool) -> tuple[str, bool] | None:
    """Run ``action`` on every rank (or rank 0 only); the first failure of any rank as (what went wrong, whether it
    was out of room), the same on every rank, or None."""
    failure = None
    if everywhere or _rank() == 0:
        try:
            action()
        except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
            failure = (_last_line(exc), _out_of_room(exc))
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failure
    failures: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    return next((tuple(f) for f in failures if f is not None), None)


def _last_line(exc: BaseException) -> str:
    """The gist of an error: torch's CheckpointException holds the writers' tracebacks, whose last line says it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:400]


def _out_of_room(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it came from) says the disk or a quota is full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(exc) for text in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _save_failed(root: Path, iteration: int, tmp: Path, failure: tuple[str, bool]) -> str:
    what, out_of_room = failure
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    full = out_of_room or (free is not None and free < _ALMOST_FULL)
    room = f"{_size(free)} free on the file system of {root}"
    why = f"the disk is full ({room}; the write said {what})" if full else f"{what} ({room})"
    fix = "Free some space (or point checkpoint.dir elsewhere) and run again" if full else "Fix the cause and run again"
    previous = find_checkpoint(root)
    if previous is None:
        kept = f"there is no earlier complete checkpoint in {root}"
    else:
        kept = f"the previous checkpoint {previous} (step {read_marker(previous).get('iteration')}) is intact"
        fix += " to resume from it"
    return f"could not save the checkpoint of step {iteration}: {why}. The unfinished {tmp} was removed; {kept}. {fix}."


def _size(free: int | None) -> str:
    if free is None:
        return "unknown room"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if free >= scale:
            return f"{free / scale:.1f} {unit}"
    return f"{free} bytes"


def load_checkpoint(checkpoint: Path, sharded_state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the sharded state and this rank's JSON state from a complete checkpoint."""
    rank_file = checkpoint / f"rank_{_rank():05d}.json"
    if not rank_file.is_file():
        raise CheckpointError(
            f"{checkpoint} has no state for rank {_rank()} ({rank_file.name}); it was saved with fewer processes. "
            "Resume with the same number of processes, or start from an export"
        )
    rank_state = _read_rank_state(rank_file)
    state = load_sharded(checkpoint, sharded_state_dict)
    _check_extra_state(checkpoint, state)
    return state, rank_state


def _read_rank_state(rank_file: Path) -> dict[str, Any]:
    """A rank's JSON state, its loader state checked by decoding it (which builds only plain values and
    Energon's state classes) before anything of the checkpoint is loaded."""
    try:
        state = json.loads(rank_file.read_text())
        loader = state.get("loader") or {}
        if loader.get("energon") is not None:
            state_from_json(loader["energon"])
    except (ValueError, AttributeError, DataError) as exc:
        raise CheckpointError(f"{rank_file} is not a rank state dfmkit wrote: {exc} (the file is foreign or was "
                              "altered); not resuming from it") from None
    return state


def _check_extra_state(checkpoint: Path, state: Mapping[str, Any]) -> None:
    """Refuse module extra state that loading it into the model would unpickle. dfmkit trains without FP8, so the
    ``_extra_state`` of its modules is None (megatron's linears) or an empty tensor (TransformerEngine's, e.g. the
    ``te`` attention backend); TransformerEngine's ``set_extra_state`` runs ``pickle.loads`` on a non-empty byte
    tensor, which the weights-only reader lets through as a tensor."""
    for key, value in state.items():
        if isinstance(value, Mapping):
            _check_extra_state(checkpoint, value)
        elif str(key).endswith("_extra_state") and not (value is None or
                                                   (isinstance(value, torch.Tensor) and value.numel() == 0)):
            raise CheckpointError(f"{checkpoint} holds extra state for {key} ({type(value).__name__}), which a "
                                  "checkpoint of dfmkit (trained without FP8) never holds and which loading would "
                                  "unpickle; not loading it (the checkpoint is foreign or was altered)")


def load_sharded(checkpoint: Path, sharded_state_dict: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``sharded_state_dict`` from megatron's distributed checkpoint in ``checkpoint``, read without
    running code from it: ``common.pt`` weights-only (checked here, whatever torch's default), ``.metadata`` and
    the byte entries through :func:`~dfmkit.compat.torch_dcp.restricted_unpickling`. A file that is not plain data
    is a :class:`CheckpointError` naming it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    metadata = checkpoint / ".metadata"
    if metadata.is_file():  # read here first too: torch's loader retries a failed read and wraps errors per rank
        with open(metadata, "rb") as stream:
            MetadataUnpickler(stream, source=str(metadata)).load()
    common = checkpoint / COMMON_STATE_FNAME
    if common.is_file():  # megatron reads it with torch's default, weights-only unless the environment says not
        load_weights_only(common, str(common), map_location="cpu")
    with restricted_unpickling(checkpoint):
        return dist_checkpointing.load(sharded_state_dict, str(checkpoint))


def rng_state() -> dict[str, Any]:
    """This rank's global RNG states as JSON-able lists (restored by :func:`set_rng_state`)."""
    import random

    import numpy as np

    state: dict[str, Any] = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["tracker"] = {k: v.tolist() for k, v in get_cuda_rng_tracker().get_states().items()}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states({k: torch.tensor(v, dtype=torch.uint8) for k, v in state["tracker"].items()})


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
