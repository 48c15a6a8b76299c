"""torch.distributed.checkpoint unpickles nothing but data: ``.metadata`` with a restricted unpickler, byte entries
weights-only.

Checked on torch 2.13.0 (megatron-core 0.16.1's dist_checkpointing reads through it).

A checkpoint a user receives must not run code when dfmkit reads it, and torch's reader unpickles two things from it:

- ``restricted_metadata``: ``FileSystemReader.read_metadata`` is a plain ``pickle.load`` of the checkpoint's
  ``.metadata``, which can call any importable function. It is replaced by one that reads the file with
  :class:`MetadataUnpickler`, which admits only the classes such a file is made of, and otherwise does what torch's
  does (a ``storage_meta`` with this reader's ``load_id``). It relies on the reader's private ``_get_metadata_path``
  and its ``fs`` and ``load_id`` attributes.
- ``weights_only_bytes``: ``DefaultLoadPlanner.load_bytes`` (megatron's ``MCoreLoadPlanner`` inherits it) reads each
  byte entry of the ``.distcp`` files (megatron's ShardedObjects, e.g. the ``_extra_state`` of its parallel linears)
  with ``torch.load(weights_only=False)``. It is replaced by the same method with ``weights_only=True``: tensors,
  containers and the few classes registered with ``torch.serialization.add_safe_globals``. It relies on the
  planner's ``flatten_state_dict``, ``original_state_dict``, ``mappings``, ``state_dict`` and ``metadata``
  attributes and on ``default_planner.set_element``.

Both patches hold inside :func:`restricted_unpickling`, which also turns a refusal (which torch's loader wraps per
rank in a ``CheckpointException``) back into the :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from dfmkit.compat import missing_attributes, missing_parameters, replace
from dfmkit.errors import CheckpointError

CHECKED_ON = {"torch": "2.13.0", "megatron-core": "0.16.1"}

_METADATA_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                     "torch.distributed.checkpoint.filesystem"}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint ``.metadata``: its dataclasses and enums, ``torch.Size``,
    dtypes and layouts, and nothing else (a pickle can otherwise call any importable function)."""

    def __init__(self, file: Any, *, source: str = "a checkpoint's .metadata"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        found = None
        if name.isidentifier():
            if module in _METADATA_MODULES:
                found = super().find_class(module, name)
                found = found if isinstance(found, type) and found.__module__ == module else None
            elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
                found = super().find_class(module, name)
            elif (module, name) == ("torch.serialization", "_get_layout"):  # how torch pickles a layout
                found = super().find_class(module, name)
        if found is None:
            raise CheckpointError(f"{self.source} refers to {module}.{name}, which torch's checkpoint metadata never "
                                  "holds; not loading it (the file is foreign or was altered)")
        return found


def load_weights_only(file: str | os.PathLike[str] | IO[bytes], source: str, map_location: Any = None) -> Any:
    """``torch.load(file, weights_only=True)``: tensors, containers and the classes registered with
    ``torch.serialization.add_safe_globals``; any other pickle is a :class:`CheckpointError` naming ``source``."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message: a general first line, then what was refused, then a pointer to its documentation
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((line for line in lines[1:] if not line.startswith("Check the documentation")),
                   lines[0] if lines else "unreadable")
        raise CheckpointError(f"{source} is not plain data ({why[:300]}); not loading it (the file is foreign or was "
                              "altered)") from None


@contextlib.contextmanager
def restricted_unpickling(checkpoint: str | os.PathLike[str]) -> Iterator[None]:
    """Inside the block torch.distributed.checkpoint reads the ``.metadata`` of a checkpoint with
    :class:`MetadataUnpickler` and its byte entries weights-only; a file that either refuses is a
    :class:`CheckpointError` naming it (``checkpoint``: the folder being read, for the messages)."""
    from torch.distributed.checkpoint import default_planner
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = MetadataUnpickler(stream, source=str(path)).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        storage = getattr(self.metadata, "storage_data", {}).get(read_item.storage_index)
        where = Path(checkpoint) / storage.relative_path if storage is not None else Path(checkpoint)
        loaded = load_weights_only(value, f"{where} (its entry {read_item.dest_index.fqn})")
        if self.flatten_state_dict:
            default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded

    patched = ((FileSystemReader, "read_metadata", read_metadata),
               (default_planner.DefaultLoadPlanner, "load_bytes", load_bytes))
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    for owner, name, value in patched:
        replace(owner, name, value)
    try:
        yield
    except CheckpointException as exc:
        refused = [failure[0] for failure in exc.failures.values() if isinstance(failure[0], CheckpointError)]
        if refused:  # (from any rank: torch gathers every rank's failures)
            raise refused[0] from None
        raise
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def check() -> list[str]:
    return _check_restricted_metadata() + _check_weights_only_bytes()


def _check_restricted_metadata() -> list[str]:
    import dataclasses

    from torch.distributed.checkpoint import filesystem, metadata

    patch = "restricted_metadata"
    problems = missing_attributes(patch, filesystem, "FileSystemReader")
    problems += missing_attributes(patch, metadata, "StorageMeta", "Metadata")
    if problems:
        return problems
    reader = filesystem.FileSystemReader
    problems += missing_attributes(patch, reader, "read_metadata")
    problems += missing_parameters(patch, reader, "_get_metadata_path", "rank")
    instance = reader("/nonexistent")  # (touches no file)
    problems += [f"{patch}: a FileSystemReader has no '{name}'" for name in ("fs", "load_id")
                 if not hasattr(instance, name)]
    if hasattr(instance, "fs"):
        problems += missing_attributes(patch, type(instance.fs), "create_stream")
    for cls, field in ((metadata.StorageMeta, "load_id"), (metadata.Metadata, "storage_meta")):
        if field not in {f.name for f in dataclasses.fields(cls)}:
            problems.append(f"{patch}: {cls.__module__}.{cls.__qualname__} has no field '{field}'")
    return problems


def _check_weights_only_bytes() -> list[str]:
    import dataclasses

    from torch.distributed.checkpoint import api, default_planner, filesystem, metadata, planner

    patch = "weights_only_bytes"
    problems = missing_attributes(patch, default_planner, "DefaultLoadPlanner", "set_element")
    problems += missing_attributes(patch, api, "CheckpointException")
    problems += missing_attributes(patch, filesystem, "_StorageInfo")
    if problems:
        return problems
    problems += missing_parameters(patch, default_planner.DefaultLoadPlanner, "load_bytes", "read_item", "value")
    problems += missing_attributes(patch, api.CheckpointException, "failures")
    for cls, field in ((planner.ReadItem, "dest_index"), (planner.ReadItem, "storage_index"),
                       (metadata.Metadata, "storage_data"), (filesystem._StorageInfo, "relative_path")):
        if field not in {f.name for f in dataclasses.fields(cls)}:
            problems.append(f"{patch}: {cls.__module__}.{cls.__qualname__} has no field '{field}'")
    instance = default_planner.DefaultLoadPlanner()
    instance.set_up_planner({}, metadata.Metadata(state_dict_metadata={}))  # (reads nothing)
    problems += [f"{patch}: a set-up DefaultLoadPlanner has no '{name}'"
                 for name in ("flatten_state_dict", "original_state_dict", "mappings", "state_dict", "metadata")
                 if not hasattr(instance, name)]
    return problems
