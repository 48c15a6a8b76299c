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

Loading runs no code from the checkpoint (:func:`load_sharded`): ``common.pt`` is read weights-only,
torch.distributed.checkpoint's ``.metadata`` with an unpickler that admits only the classes such a file is made of,
and the byte entries of the ``.distcp`` files weights-only (:func:`dfmkit.compat.torch_dcp.restricted_unpickling`);
the loader state in ``rank_*.json`` builds only plain values and Energon's state classes
(:func:`dfmkit.data.loader.state_from_json`); module extra state that TransformerEngine would unpickle is refused.
A checkpoint that holds anything else is refused, naming the file, before any of it reaches the model or loader.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dfmkit.compat.megatron_checkpoint import synchronous_save_results
from dfmkit.compat.torch_dcp import MetadataUnpickler, load_weights_only, restricted_unpickling
from dfmkit.data import DataError
from dfmkit.data.loader import state_from_json
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
    synchronous_save_results()
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
