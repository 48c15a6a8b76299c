"""torch.distributed.checkpoint reads a checkpoint's ``.metadata`` pickle with a restricted unpickler.

Checked on torch 2.13.0 (megatron-core 0.16.1's dist_checkpointing reads through it).

torch's ``FileSystemReader.read_metadata`` is a plain ``pickle.load`` of the checkpoint's ``.metadata``, which
can call any importable function: a checkpoint a user receives must not run code when dfmkit reads it. Inside
:func:`restricted_metadata` the method is replaced by one that reads the file with :class:`MetadataUnpickler`,
which admits only the classes such a file is made of, and otherwise does what torch's does (a ``storage_meta``
with this reader's ``load_id``). It relies on the reader's private ``_get_metadata_path`` and its ``fs`` and
``load_id`` attributes.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from typing import Any

import torch

from dfmkit.compat import missing_attributes, missing_parameters, replace
from dfmkit.errors import CheckpointError

CHECKED_ON = {"torch": "2.13.0", "megatron-core": "0.16.1"}

_METADATA_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                     "torch.distributed.checkpoint.filesystem"}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint ``.metadata``: its dataclasses and enums, ``torch.Size``,
    dtypes and layouts, and nothing else (a pickle can otherwise call any importable function)."""

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
            raise CheckpointError(f"a checkpoint's .metadata refers to {module}.{name}, which torch's checkpoint "
                                  "metadata never holds; not loading it (the file is foreign or was altered)")
        return found


@contextlib.contextmanager
def restricted_metadata() -> Iterator[None]:
    """Inside the block torch.distributed.checkpoint reads ``.metadata`` files with
    :class:`MetadataUnpickler` (torch's own reader is a plain ``pickle.load``)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    original = FileSystemReader.read_metadata

    def read_metadata(self, *args: Any, **kwargs: Any):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as stream:
            metadata = MetadataUnpickler(stream).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    replace(FileSystemReader, "read_metadata", read_metadata)
    try:
        yield
    finally:
        FileSystemReader.read_metadata = original


def check() -> list[str]:
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
