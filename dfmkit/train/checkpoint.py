"""Checkpoints: megatron-core dist_checkpointing (torch_dist), written aside and published atomically.

Layout of ``checkpoint.dir``::

    iter_0000200/            a complete checkpoint (megatron's files + dfmkit.json + rank_*.json)
    iter_0000400/
    latest                   text: the iteration of the newest complete checkpoint
    .tmp_iter_0000600/       a save in progress (or one killed mid-way: ignored, cleared next save)

A save writes everything into the ``.tmp_`` folder, then ``dfmkit.json`` (the completeness
marker), then renames the folder and replaces ``latest`` with ``os.replace``. A crash at any
point leaves ``latest`` naming a checkpoint that loads. Per-rank state that is not a tensor
(RNG states, the loader position) goes to ``rank_<r>.json``, never through pickle.

Loading never runs arbitrary pickle either: megatron reads its ``common.pt`` with ``torch.load``'s
weights-only unpickler, and torch.distributed.checkpoint's ``.metadata`` (a pickle) is read inside
:func:`dfmkit.compat.torch_dcp.restricted_metadata`, which admits only the classes such a file is made of.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dfmkit.compat.torch_dcp import MetadataUnpickler, restricted_metadata
from dfmkit.errors import CheckpointError

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
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """Save on every rank; returns the published folder. ``marker`` is written by rank 0 only."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = root / f".tmp_{final.name}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_iter_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    dist_checkpointing.save(sharded_state_dict, str(tmp))
    _write_atomic(tmp / f"rank_{_rank():05d}.json", json.dumps(rank_state))
    _barrier()
    if _rank() == 0:
        _write_atomic(tmp / MARKER, json.dumps({**marker, "iteration": iteration}, indent=2))
        if final.exists():  # a re-save of the same iteration replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_atomic(root / LATEST, f"{iteration}\n")
        for old in complete_iterations(root)[:-keep_last]:
            shutil.rmtree(iteration_dir(root, old), ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(checkpoint: Path, sharded_state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the sharded state and this rank's JSON state from a complete checkpoint."""
    from megatron.core import dist_checkpointing

    rank_file = checkpoint / f"rank_{_rank():05d}.json"
    if not rank_file.is_file():
        raise CheckpointError(
            f"{checkpoint} has no state for rank {_rank()} ({rank_file.name}); it was saved with fewer processes. "
            "Resume with the same number of processes, or start from an export"
        )
    metadata = checkpoint / ".metadata"
    if metadata.is_file():  # read here first: an error inside torch's loader comes back wrapped per rank
        with open(metadata, "rb") as stream:
            MetadataUnpickler(stream).load()
    with restricted_metadata():
        state = dist_checkpointing.load(sharded_state_dict, str(checkpoint))
    return state, json.loads(rank_file.read_text())


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
