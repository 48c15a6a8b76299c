"""Megatron-Energon's webdataset readers and index made to keep every intact sample of a damaged shard, and its
loader's workers stopped.

Checked on megatron-energon 7.4.1, torch 2.13.0.

- :func:`scan_tar`: the samples of a tar found the way Energon's indexer finds them (its member-name patterns
  ``split_name_re`` and ``skip_meta_re``), but past a damaged header and up to where a cut-off file ends, with the
  byte offsets Energon's ``.tar.idx`` holds.
- :func:`index_damaged_shards`: Energon's indexer (``BaseWebdatasetFactory.prepare_dataset``) fails on a shard it
  cannot read to its end (no samples: an assertion), and indexes only the samples before a damaged header. Such
  shards are left out of its run and added afterwards: a ``.tar.idx`` for the samples :func:`scan_tar` found
  (Energon's ``TarIndexWriter``), the samples the shard should hold in ``.nv-meta/.info.json`` (``shard_counts``)
  and its name in its split in ``.nv-meta/split.yaml`` (``split_parts``). The intact samples are read; the lost
  ones fail to read and are counted.
- :func:`index_problem`: what is wrong with a shard's ``.tar.idx`` (read with Energon's ``TarIndexReader``).
- :func:`harden_readers`: Energon's ``WebdatasetSampleLoaderDataset`` reads each sample through its tar readers
  (``join_readers``; a ``ShardInfosITarReader``), and a read error ends the epoch. They are wrapped in
  :class:`TolerantReader`: a sample whose read fails is read again through an index made from the tar itself
  (:func:`scan_tar`; the reader's private ``_get_item_by_sample_pointer`` reads it at the found offset): a missing,
  empty or wrong ``.tar.idx`` costs no sample. A sample that cannot be read that way either becomes None (Energon
  skips it) and a counted ``unreadable`` skip named by shard and position (from the reader's ``shard_infos``,
  ``shard_count_cumsum`` and ``shard_tar_file_idxs``). Before each read the wrapper asks the skip counter whether
  every sample of the part this process reads (the dataset's ``slice_offsets``) was skipped, which stops a loader
  that would otherwise look for a usable sample forever.
- :func:`shutdown_workers`: Energon's savable loader is a torch ``DataLoader``; its worker processes are stopped
  through the DataLoader's private ``_iterator`` and that iterator's ``_shutdown_workers``.
- :func:`loader_position` / :func:`state_at`: the state ``SavableDataLoader.save_state_rank()`` would have given at
  an earlier point, for a stop that interrupts a step's batches and saves the step's start. With worker processes
  ``save_state_rank`` sends the workers the last sample index received from each (the private
  ``_worker_sample_counters``, with ``_next_worker_id``) and each answers with its checkpoint at that index from the
  few it keeps (``get_checkpoint`` through ``cmd_queues``/``result_queues``; it answers between samples, so taking it
  at every step would wait for the workers); :func:`loader_position` copies those counters, and :func:`state_at`
  asks the workers for them, with a time limit, and merges the answers as ``save_state_rank`` does. Without workers,
  or before they start (``_has_workers``), the state is read in this process and is the position itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tarfile
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from dfmkit.compat import missing_attributes, missing_parameters

if TYPE_CHECKING:
    from dfmkit.data.skips import SkipCounter

CHECKED_ON = {"megatron-energon": "7.4.1", "torch": "2.13.0"}

log = logging.getLogger("dfmkit.data")


# --------------------------------------------------------------------------------------------
# Samples of a tar, as Energon's index holds them
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TarScan:
    """The complete samples of a tar: their keys, the byte offset where each starts, and where the last ends."""

    keys: list[str]
    starts: list[int]
    end: int
    problem: str = ""  # why the tar cannot be read to its end ("" if it can)
    partial: int = 0  # samples present only in part where the file is cut off (0 or 1)

    def span(self, position: int) -> tuple[int, int]:
        """(byte offset, byte size) of sample ``position``."""
        stop = self.starts[position + 1] if position + 1 < len(self.starts) else self.end
        return self.starts[position], stop - self.starts[position]


def _block_end(offset_data: int, size: int) -> int:
    return offset_data + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def scan_tar(file: BinaryIO) -> TarScan:
    """The samples of the tar ``file`` (opened for binary reading), grouped by key as Energon's indexer groups
    members. Damaged headers are stepped over (the samples after them are found); a sample whose data the end of
    the file cuts off is left out and counted in ``partial``."""
    from megatron.energon.flavors.webdataset.config import skip_meta_re, split_name_re

    keys: list[str] = []
    starts: list[int] = []
    problem, next_header, end, last_in_sample = "", 0, 0, False
    try:
        with tarfile.open(fileobj=file, mode="r:", ignore_zeros=True) as tar:
            for member in tar:  # raises where the data of the member before is cut off
                if member.offset != next_header and not problem:
                    problem = f"damaged tar header at byte {next_header}"
                next_header = _block_end(member.offset_data, member.size)
                match = split_name_re.match(member.name or "")
                last_in_sample = bool(member.isreg() and match and not skip_meta_re.match(member.name))
                if last_in_sample:
                    if not keys or keys[-1] != match.group(1):
                        keys.append(match.group(1))
                        starts.append(member.offset)
                    end = next_header
    except (tarfile.TarError, OSError, EOFError) as exc:
        if not keys and not starts:
            return TarScan([], [], 0, f"{type(exc).__name__}: {exc}")
        partial = 1 if last_in_sample else 0
        if partial:
            keys.pop()
            end = starts.pop()
        return TarScan(keys, starts, end, f"cut off ({type(exc).__name__}: {exc})", partial)
    file.seek(next_header)
    while chunk := file.read(1 << 20):  # after the last member: only the end-of-archive zeros
        if chunk.strip(b"\0"):
            problem = problem or f"unreadable data after byte {next_header}"
            break
    if not keys and not problem:
        problem = "no samples"
    return TarScan(keys, starts, end, problem)


def index_damaged_shards(root: str | Path, damaged: Mapping[str, tuple[TarScan, int, str]]) -> None:
    """After Energon indexed the other shards of the folder ``root``: add each damaged shard ``name -> (scan,
    samples it should hold, split)`` to the index, with the samples its scan found."""
    import yaml
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.config import INFO_JSON_FILENAME, MAIN_FOLDER_NAME
    from megatron.energon.flavors.webdataset.itar import TarIndexWriter

    if not damaged:
        return
    root = Path(root)
    for name, (scan, _, _) in damaged.items():
        with TarIndexWriter(EPath(root / name)) as writer:
            for start in scan.starts:
                writer.append(start)
            writer.append(scan.end)
    info_path = root / MAIN_FOLDER_NAME / INFO_JSON_FILENAME
    info = json.loads(info_path.read_text())
    info["shard_counts"].update({name: int(samples) for name, (_, samples, _) in damaged.items()})
    info_path.write_text(json.dumps(info, indent=2))
    split_path = root / MAIN_FOLDER_NAME / "split.yaml"
    splits = yaml.safe_load(split_path.read_text())
    for name, (_, _, split) in damaged.items():
        parts = splits["split_parts"]
        parts[split] = [*(parts.get(split) or []), name]
    split_path.write_text(yaml.safe_dump(splits, sort_keys=False))


def index_problem(tar: Path, samples: int) -> str:
    """What keeps the shard ``tar`` (``samples`` samples in the index) from being read as Energon indexed it, or
    "": a missing or broken ``.tar.idx``, or a file shorter than it was when indexed."""
    from megatron.energon.flavors.webdataset.itar import ITAR_SUFFIX, TarIndexReader

    index = tar.with_suffix(ITAR_SUFFIX)
    rebuilt = "its samples are read through an index made from the tar itself; re-index the folder " \
              "(dfmkit.data.prepare.index_dataset) to fix it"
    if not index.is_file():
        return f"its index {index.name} is missing: {rebuilt}"
    try:
        with TarIndexReader(str(tar)) as reader:
            entries = len(reader)
            end = reader[entries - 1] if entries else 0
    except Exception as exc:
        return f"its index {index.name} cannot be read ({type(exc).__name__}: {exc}): {rebuilt}"
    if entries != samples + 1:
        return (f"its index {index.name} ({index.stat().st_size} bytes) holds {max(entries - 1, 0)} samples, not "
                f"{samples}: {rebuilt}")
    size = tar.stat().st_size
    if end > size:
        return (f"the file is {size} bytes, shorter than the {end} it had when indexed: the samples past its end are "
                "counted as unreadable; re-copy it")
    return ""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class TolerantReader:
    """Wraps an Energon ``ShardInfosITarReader``: a sample whose read fails is read again through an index made
    from its tar; one that cannot be read becomes None (Energon skips it) and an ``unreadable`` skip."""

    def __init__(self, inner: Any, skips: SkipCounter, owner: Any = None):
        self._inner = inner
        self._skips = skips
        self._owner = owner  # the WebdatasetSampleLoaderDataset reading through this reader
        self._scans: dict[int, TarScan] = {}  # tar file id -> its samples, scanned in this process

    def _check_progress(self) -> None:
        offsets = getattr(self._owner, "slice_offsets", None)
        if offsets:
            first, stop = int(offsets[0]), int(offsets[-1])
            self._skips.check_progress(stop - first, f"the {stop - first} samples of {self._inner.base_path} that "
                                                     f"this loader process reads (#{first} to #{stop - 1})")

    def _locate(self, index: int) -> tuple[int, Any, int]:
        """(tar file id, shard info, position in the shard) of sample ``index``."""
        shard = bisect_right(self._inner.shard_count_cumsum, index) - 1
        if not 0 <= shard < len(self._inner.shard_infos):
            raise IndexError(f"sample {index} is not in this split")
        return (self._inner.shard_tar_file_idxs[shard], self._inner.shard_infos[shard],
                index - self._inner.shard_count_cumsum[shard])

    def _read_by_scan(self, index: int, tar_id: int, shard: Any, position: int) -> Any:
        from megatron.energon.flavors.webdataset.itar import ITarSamplePointer

        scan = self._scans.get(tar_id)
        if scan is None:
            with shard.path.open("rb") as file:
                scan = self._scans[tar_id] = scan_tar(file)
            log.info("shard %s: read through an index made from the tar itself (%d samples found%s)",
                     shard.name, len(scan.keys), f"; {scan.problem}" if scan.problem else "")
        if position >= len(scan.starts):
            raise ValueError(f"the shard holds {len(scan.starts)} intact samples of the {shard.count} indexed"
                             f"{f' ({scan.problem})' if scan.problem else ''}; re-copy or re-prepare it")
        offset, size = scan.span(position)
        pointer = ITarSamplePointer(tar_file_id=tar_id, byte_offset=offset, byte_size=size)
        return self._inner._get_item_by_sample_pointer(pointer, index)

    def __getitem__(self, index: Any) -> Any:
        self._check_progress()
        try:
            sample = self._inner[index]
        except Exception as exc:
            error = exc
        else:
            if sample is None:  # left out by the dataset's own excludes
                self._skips.met(index)
            return sample
        where = f"#{index}"
        try:
            tar_id, shard, position = self._locate(index)
            where = f"{shard.name}#{position}"
            sample = self._read_by_scan(index, tar_id, shard, position)
        except Exception as exc:
            error = exc
        else:
            if sample is None:
                self._skips.met(index)
            return sample
        self._skips.count("unreadable", index, f"{type(error).__name__}: {error}", where=where)
        return None

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_inner", "_skips", "_owner", "_scans"):
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
            node.join_readers = [r if isinstance(r, TolerantReader) else TolerantReader(r, skips, node)
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


@dataclasses.dataclass(frozen=True)
class LoaderPosition:
    """Where an Energon savable loader was: its state (read in this process), or what its workers are asked for it."""

    state: Any = None  # a SavableDataLoaderState or None (the loader's start), when read in this process
    worker_sample_counters: tuple[int, ...] | None = None  # the last sample index received from each worker
    next_worker_id: int = 0


def loader_position(loader: Any) -> LoaderPosition:
    """Where Energon's savable ``loader`` is now (cheap: no question to the worker processes)."""
    if loader.num_workers > 0 and loader._has_workers:
        return LoaderPosition(worker_sample_counters=tuple(loader._worker_sample_counters),
                              next_worker_id=loader._next_worker_id)
    return LoaderPosition(state=loader.save_state_rank())


def state_at(loader: Any, position: LoaderPosition, timeout: float) -> Any:
    """``loader.save_state_rank()`` as it was at ``position``; a worker that does not answer within ``timeout``
    seconds is a TimeoutError."""
    import queue

    from megatron.energon.savable_loader import SavableDataLoaderState

    if position.worker_sample_counters is None:
        return position.state
    for commands in loader.cmd_queues:
        commands.put(("get_checkpoint", list(position.worker_sample_counters)))
    answers: dict[int, Any] = {}
    for results in loader.result_queues:
        try:
            answers.update(results.get(timeout=timeout))
        except queue.Empty:
            raise TimeoutError(f"a data loader worker did not say where it was within {timeout:g} s") from None
    worker_states = [answers[worker] for worker in range(len(answers))]
    for answer in worker_states:
        if isinstance(answer, Exception):
            raise answer
    return SavableDataLoaderState(worker_states=worker_states, next_worker_id=position.next_worker_id,
                                  micro_batch_size=loader._get_batch_size())


def _fields(cls: type) -> Sequence[str]:
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(
        getattr(cls, "__annotations__", {}))


def check() -> list[str]:
    import torch.utils.data
    from megatron.energon.flavors import BaseWebdatasetFactory
    from megatron.energon.flavors.webdataset import config, itar, itar_reader, sample_loader, structs
    from torch.utils.data import dataloader

    patch = "scan_tar"
    problems = missing_attributes(patch, config, "split_name_re", "skip_meta_re")
    patch = "index_damaged_shards"
    problems += missing_attributes(patch, config, "MAIN_FOLDER_NAME", "INFO_JSON_FILENAME")
    problems += missing_attributes(patch, itar, "TarIndexWriter", "TarIndexReader", "ITAR_SUFFIX")
    problems += missing_attributes(patch, BaseWebdatasetFactory, "prepare_dataset")
    problems += [f"{patch}: {structs.__name__}.WebdatasetSplits has no field '{name}'"
                 for name in ("split_parts",) if name not in _fields(structs.WebdatasetSplits)]
    patch = "harden_readers"
    problems += missing_attributes(patch, sample_loader, "WebdatasetSampleLoaderDataset")
    problems += missing_attributes(patch, itar_reader, "ShardInfosITarReader")
    problems += missing_attributes(patch, itar, "ITarSamplePointer")
    if not problems:
        problems += missing_parameters(patch, sample_loader.WebdatasetSampleLoaderDataset, "__init__", "join_readers")
        problems += missing_attributes(patch, sample_loader.WebdatasetSampleLoaderDataset, "ensure_slice_offsets")
        problems += missing_parameters(patch, itar_reader.ShardInfosITarReader, "__init__", "shard_infos")
        problems += missing_parameters(patch, itar_reader.ShardInfosITarReader, "_get_item_by_sample_pointer",
                                       "sample_pointer", "restore_index")
        problems += missing_attributes(patch, itar_reader.ShardInfosITarReader, "__getitem__", "__len__")
        problems += [f"{patch}: {itar.__name__}.ITarSamplePointer has no field '{name}'"
                     for name in ("tar_file_id", "byte_offset", "byte_size")
                     if name not in _fields(itar.ITarSamplePointer)]
        problems += [f"{patch}: {structs.__name__}.ShardInfo has no field '{name}'"
                     for name in ("name", "path", "count") if name not in _fields(structs.ShardInfo)]
        import inspect

        source = inspect.getsource(itar_reader.ShardInfosITarReader.__init__)
        problems += [f"{patch}: a ShardInfosITarReader no longer sets '{name}'"
                     for name in ("shard_count_cumsum", "shard_tar_file_idxs", "shard_infos")
                     if f"self.{name}" not in source]
        source = inspect.getsource(sample_loader.WebdatasetSampleLoaderDataset)
        if "self.slice_offsets" not in source:
            problems.append(f"{patch}: a WebdatasetSampleLoaderDataset no longer has 'slice_offsets'")
    patch = "loader_position"
    from megatron.energon import savable_loader

    problems += missing_attributes(patch, savable_loader.SavableDataLoader, "save_state_rank", "_get_batch_size")
    problems += missing_parameters(patch, savable_loader.SavableDatasetWrapper, "get_checkpoint",
                                   "last_sample_indexes")
    problems += [f"{patch}: {savable_loader.__name__}.SavableDataLoaderState has no field '{name}'"
                 for name in ("worker_states", "next_worker_id", "micro_batch_size")
                 if name not in _fields(savable_loader.SavableDataLoaderState)]
    import inspect

    source = inspect.getsource(savable_loader.SavableDataLoader)
    problems += [f"{patch}: a SavableDataLoader no longer has '{name}'"
                 for name in ("_has_workers", "_worker_sample_counters", "_next_worker_id", "cmd_queues",
                              "result_queues", '_worker_command("get_checkpoint", self._worker_sample_counters)')
                 if name not in source]
    patch = "shutdown_workers"
    if not hasattr(torch.utils.data.DataLoader([]), "_iterator"):
        problems.append(f"{patch}: a torch.utils.data.DataLoader has no '_iterator'")
    if hasattr(dataloader, "_MultiProcessingDataLoaderIter"):
        problems += missing_attributes(patch, dataloader._MultiProcessingDataLoaderIter, "_shutdown_workers")
    else:
        problems += missing_attributes(patch, dataloader, "_MultiProcessingDataLoaderIter")
    return problems
