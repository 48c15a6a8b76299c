"""Megatron-Energon's webdataset readers made tolerant of unreadable samples, and its loader's workers stopped.

Checked on megatron-energon 7.4.1, torch 2.13.0.

- :func:`harden_readers`: Energon's ``WebdatasetSampleLoaderDataset`` reads each sample through its tar readers
  (``join_readers``), and a read error (a tar truncated after it was indexed, a damaged header) ends the epoch.
  Its ``join_readers`` are replaced by :class:`TolerantReader` wrappers, under which such a sample becomes None
  (Energon skips it) and a counted ``unreadable`` skip named by shard and index (the shard's name comes from the
  reader's private ``_get_itar_sample_pointer`` and its ``tar_filenames``).
- :func:`shutdown_workers`: Energon's savable loader is a torch ``DataLoader``; its worker processes are stopped
  through the DataLoader's private ``_iterator`` and that iterator's ``_shutdown_workers``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dfmkit.compat import missing_attributes, missing_parameters

if TYPE_CHECKING:
    from dfmkit.data.skips import SkipCounter

CHECKED_ON = {"megatron-energon": "7.4.1", "torch": "2.13.0"}


class TolerantReader:
    """Wraps an Energon tar reader: a sample that cannot be read becomes None (Energon skips it)."""

    def __init__(self, inner: Any, skips: SkipCounter):
        self._inner = inner
        self._skips = skips

    def __getitem__(self, index: Any) -> Any:
        try:
            return self._inner[index]
        except Exception as exc:
            shard = ""
            try:
                shard = self._inner.tar_filenames[self._inner._get_itar_sample_pointer(index).tar_file_id]
            except Exception:
                pass
            self._skips.count("unreadable", f"{shard}#{index}", f"{type(exc).__name__}: {exc}")
            return None

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_inner", "_skips"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def harden_readers(dataset: Any, skips: SkipCounter) -> int:
    """Wrap the tar readers of every Energon webdataset sample loader inside ``dataset``; returns how many
    sample loaders were found."""
    from megatron.energon.flavors.webdataset.sample_loader import WebdatasetSampleLoaderDataset

    wrapped, stack, seen = 0, [dataset], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, WebdatasetSampleLoaderDataset):
            node.join_readers = [r if isinstance(r, TolerantReader) else TolerantReader(r, skips)
                                 for r in node.join_readers]
            wrapped += 1
            continue
        inner = getattr(node, "dataset", None)
        if inner is not None:
            stack.append(inner)
        for item in getattr(node, "datasets", None) or ():
            stack.append(item[0] if isinstance(item, tuple) else item)
    return wrapped


def shutdown_workers(loader: Any) -> None:
    """Stop the worker processes of ``loader`` (a torch DataLoader, such as Energon's savable loader), if any."""
    shutdown = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def check() -> list[str]:
    import torch.utils.data
    from megatron.energon.flavors.webdataset import itar, itar_reader, sample_loader
    from torch.utils.data import dataloader

    patch = "harden_readers"
    problems = missing_attributes(patch, sample_loader, "WebdatasetSampleLoaderDataset")
    problems += missing_attributes(patch, itar_reader, "ITarReader")
    problems += missing_attributes(patch, itar, "ITarSamplePointer")
    if not problems:
        problems += missing_parameters(patch, sample_loader.WebdatasetSampleLoaderDataset, "__init__", "join_readers")
        problems += missing_parameters(patch, itar_reader.ITarReader, "__init__", "tar_filenames")
        problems += missing_attributes(patch, itar_reader.ITarReader, "_get_itar_sample_pointer", "__getitem__",
                                       "__len__")
        if "tar_file_id" not in getattr(itar.ITarSamplePointer, "__annotations__", {}):
            problems.append(f"{patch}: {itar.__name__}.ITarSamplePointer has no field 'tar_file_id'")
    patch = "shutdown_workers"
    if not hasattr(torch.utils.data.DataLoader([]), "_iterator"):
        problems.append(f"{patch}: a torch.utils.data.DataLoader has no '_iterator'")
    if hasattr(dataloader, "_MultiProcessingDataLoaderIter"):
        problems += missing_attributes(patch, dataloader._MultiProcessingDataLoaderIter, "_shutdown_workers")
    else:
        problems += missing_attributes(patch, dataloader, "_MultiProcessingDataLoaderIter")
    return problems
