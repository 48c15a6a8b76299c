"""The training data loader: Energon over a prepared folder (or mock data), yielding packed batches.

``build_train_loader(job, dp_rank, dp_size, pad_multiple)`` returns an iterator of
:class:`dfmkit.batch.PackedBatch` (one packed sequence each) with:

- ``save_state()`` -> a JSON-ready dict: the loader position of this data-parallel rank, and
  the skipped samples. Energon's state (``SavableDataLoaderState``: dataclasses, FlexState dicts,
  RNG states as tensors / numpy arrays / tuples, bytes) is written in a tagged JSON form by
  :func:`state_to_json` and read back by :func:`state_from_json`, which builds only plain values and
  the few Energon state classes such a state holds (an exact list, never a class named by the file):
  no pickle anywhere, and the result can go into the checkpoint's per-rank JSON file as it is.
- ``position()`` and ``rewind(position)``: where the loader is, cheaply enough to take at each step's start, and
  back there (the batches delivered since come again), for a stop that interrupts a step's batches.
- ``restore_state(state)``: the next batch after a restore is the batch that followed the save. The state records the
  split's index (its shards and their samples); a state saved on a dataset whose index differs (a shard re-written
  with other samples, added or gone, another dataset) is refused (:class:`DatasetChanged`, naming the differences):
  its position means nothing there. The same index under another path (a moved dataset) is restored.
- ``skips``: a :class:`~dfmkit.data.skips.SkipCounter` of the samples skipped so far, by reason, each bad
  sample counted once however often it is read (``skips.report()`` sums them up). The counts follow the batches
  delivered (each pack carries those its worker counted), and are the same with and without a resume.

Data parallelism: Energon's ``WorkerConfig(rank=dp_rank, world_size=dp_size)`` gives each DP rank
its own part of the data; tensor- and context-parallel peers share a DP rank and so get the same
batches. ``data.num_workers`` worker processes per rank (0: in the main process); they are killed
when the process that started them dies (:mod:`dfmkit.processes`).

Reading never crashes on bad data: besides the checks of the task encoder, a sample that cannot be
read where the index says is read through an index made from its tar (a missing, empty or stale
``.tar.idx`` loses no sample), and one that cannot be read at all (cut off, a damaged header) is a
counted ``unreadable`` skip named by shard (Energon's tar readers are wrapped:
:func:`dfmkit.compat.energon.harden_readers`). A shard found damaged when it was indexed keeps its intact samples,
and the ones it lost count as unreadable (see :func:`dfmkit.data.prepare.index_dataset`); DP rank 0 warns about
damaged shards and broken indexes at start. Any other error in a sample is counted as ``error``.

The loader checks at start that the dataset's latent channels and text width (``dfmkit.json``)
match the backbone's ``in_channels`` and ``text_dim``, and that its smallest sample (the latent shapes
``dfmkit prepare`` records) fits a pack of ``data.seq_length`` tokens: a mismatch is a
:class:`DataError`, not a run that skips every sample. For data without that record, a loader process
that has skipped every sample of its part of the data stops with a :class:`DataError`
(:meth:`dfmkit.data.skips.SkipCounter.check_progress`) instead of looking for a usable one forever.
It opens only a folder whose ``.nv-meta/dataset.yaml`` is the plain declaration ``dfmkit prepare``
writes, since Energon builds whatever objects a declaration names (:func:`_check_declaration`); every
path that opens a dataset (training, validation, benchmarks) goes through :class:`EnergonLoader`, which
checks it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import itertools
import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfmkit.batch import PackedBatch, round_up
from dfmkit.compat.energon import harden_readers, index_problem, loader_position, shutdown_workers, state_at
from dfmkit.data import DataError, check_fits_model
from dfmkit.latent_sizes import patch_sizes
from dfmkit.data.mock import MockLoader
from dfmkit.data.shards import ENERGON_DECLARATION, read_dataset_info
from dfmkit.data.skips import NoUsableSamples, SkipCounter
from dfmkit.parallel.context import required_pad_multiple
from dfmkit.processes import children_die_with_this_process

log = logging.getLogger("dfmkit.data")

STATE_FORMAT = "dfmkit-loader-state/1"

#: Seconds a stopping run waits for a worker process to say where it is or was (it answers between two samples).
WORKER_ANSWER_S = 10.0


# --------------------------------------------------------------------------------------------
# Loader state <-> JSON (no pickle)
# --------------------------------------------------------------------------------------------

def _tensor_payload(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def state_to_json(value: Any) -> Any:
    """Energon loader state (or any tree of dataclasses, dicts, tuples, tensors, arrays, bytes) as JSON data."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"$tensor": {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": _tensor_payload(raw)}}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError("loader state holds a numpy object array, which cannot be stored without pickle")
        array = np.ascontiguousarray(value)
        return {"$ndarray": {"dtype": array.dtype.str, "shape": list(array.shape), "data": _tensor_payload(array.tobytes())}}
    if isinstance(value, np.generic):
        return {"$npscalar": {"dtype": value.dtype.str, "value": state_to_json(value.item())}}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": _tensor_payload(bytes(value))}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"$dataclass": _tag(cls),
                "fields": {f.name: state_to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {"$tuple": [state_to_json(v) for v in value]}
    if isinstance(value, list):
        return [state_to_json(v) for v in value]
    if isinstance(value, Mapping):
        items = [[state_to_json(k), state_to_json(v)] for k, v in value.items()]
        tag = "$dict" if type(value) is dict else _tag(type(value))
        return {"$mapping": tag, "items": items}
    raise TypeError(f"loader state holds a {type(value).__module__}.{type(value).__qualname__}, which has no JSON form")


@functools.cache
def _state_classes() -> dict[str, type]:
    """The classes a saved loader state holds, by the tag :func:`state_to_json` gives them: the only ones
    :func:`state_from_json` builds. These are all that Energon's state of this loader holds (saved with 0 and with 2
    workers, shuffled or not); a name is looked up here, never imported or followed as an attribute chain."""
    from megatron.energon.flavors.webdataset.sample_loader import SliceState
    from megatron.energon.rng import SystemRngState
    from megatron.energon.savable_loader import SavableDataLoaderState, SavableDatasetCheckpoint, SavableDatasetState
    from megatron.energon.state import FlexState

    classes = (SavableDataLoaderState, SavableDatasetCheckpoint, SavableDatasetState, SliceState, SystemRngState,
               FlexState)
    return {_tag(cls): cls for cls in classes}


def _tag(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _state_class(name: Any) -> type:
    cls = _state_classes().get(name) if isinstance(name, str) else None
    if cls is None:
        raise DataError(f"the loader state names {str(name)[:100]!r}, which is not one of the Energon classes a "
                        "saved loader state holds; not building it")
    return cls


def _dtype(name: Any, kind: str) -> Any:
    """The torch dtype (``kind`` "torch") or numpy dtype named ``name``; no object dtypes."""
    if kind == "torch":
        dtype = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
        if not isinstance(dtype, torch.dtype):
            raise DataError(f"the loader state names tensor dtype {str(name)[:40]!r}, which is not a torch dtype")
        return dtype
    dtype = np.dtype(name) if isinstance(name, str) else None
    if dtype is None or dtype.hasobject:
        raise DataError(f"the loader state names numpy dtype {str(name)[:40]!r}; only plain (non-object) dtypes")
    return dtype


def state_from_json(value: Any) -> Any:
    """The inverse of :func:`state_to_json`. It builds plain values, tensors, arrays and the Energon state classes
    of :func:`_state_classes`, nothing else: anything else, or a malformed entry, is a :class:`DataError`."""
    try:
        return _from_json(value)
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
        raise DataError(f"malformed loader state ({type(exc).__name__}: {str(exc)[:200]})") from None


def _from_json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if not isinstance(value, dict) or len(value) not in (1, 2):
        raise DataError(f"malformed loader state entry: {str(value)[:100]}")
    if "$float" in value:
        return float(value["$float"])
    if "$tensor" in value:
        spec = value["$tensor"]
        dtype = _dtype(spec["dtype"], "torch")
        raw = bytearray(base64.b64decode(spec["data"]))
        if not raw:
            return torch.empty(spec["shape"], dtype=dtype)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(spec["shape"]).clone()
    if "$ndarray" in value:
        spec = value["$ndarray"]
        dtype = _dtype(spec["dtype"], "numpy")
        return np.frombuffer(base64.b64decode(spec["data"]), dtype=dtype).reshape(spec["shape"]).copy()
    if "$npscalar" in value:
        spec = value["$npscalar"]
        return _dtype(spec["dtype"], "numpy").type(_from_json(spec["value"]))
    if "$bytes" in value:
        return base64.b64decode(value["$bytes"])
    if "$tuple" in value:
        return tuple(_from_json(v) for v in value["$tuple"])
    if "$mapping" in value:
        cls = dict if value["$mapping"] == "$dict" else _state_class(value["$mapping"])
        if not issubclass(cls, dict):
            raise DataError(f"the loader state names {value['$mapping']!r} as a mapping, which it is not")
        return cls({_hashable(_from_json(k)): _from_json(v) for k, v in value["items"]})
    if "$dataclass" in value:
        cls = _state_class(value["$dataclass"])
        if not dataclasses.is_dataclass(cls):
            raise DataError(f"the loader state names {value['$dataclass']!r} as a dataclass, which it is not")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(value["fields"]) - set(fields)
        if unknown:
            raise DataError(f"the loader state gives {cls.__qualname__} fields it does not have: "
                            f"{', '.join(sorted(map(str, unknown)))[:200]}")
        given = {k: _from_json(v) for k, v in value["fields"].items()}
        obj = cls(**{k: v for k, v in given.items() if fields[k].init})
        for k, v in given.items():
            if not fields[k].init:
                object.__setattr__(obj, k, v)
        return obj
    raise DataError(f"malformed loader state entry: {str(value)[:100]}")


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


# --------------------------------------------------------------------------------------------
# Loader construction
# --------------------------------------------------------------------------------------------


def _recipe_and_task_encoder(job_or_recipe: Any) -> tuple[Any, Any]:
    """(recipe, the resolved task-encoder component or None) from a Job or a Recipe."""
    if hasattr(job_or_recipe, "components") and hasattr(job_or_recipe, "recipe"):
        return job_or_recipe.recipe, job_or_recipe.components.get("task_encoder")
    return job_or_recipe, None


def _error_handler(skips: SkipCounter):
    unknown = itertools.count()

    def handle(exc: Exception, sample: Any, sources: Any = None) -> None:
        source = sources[0] if sources else None
        index = getattr(source, "index", None)
        where = f"{getattr(source, 'shard_name', '')}#{index}" if source is not None else ""
        # A sample of unknown source is counted at each encounter: it has no identity to be known by.
        identity = index if isinstance(index, int) else f"unknown source {next(unknown)}"
        skips.count("error", identity, f"{type(exc).__name__}: {exc}", where=where)

    return handle


def _check_dataset(path: str, split: str) -> dict[str, Any] | None:
    """A clear error unless ``path`` is a folder that ``dfmkit prepare`` indexed, with a dataset declaration that
    builds nothing (:func:`_check_declaration`); else the folder's ``dfmkit.json`` (None without one)."""
    root = Path(path)
    if not path:
        raise DataError("data.path is empty: point it at a folder written by `dfmkit prepare`")
    if root.is_file():
        raise DataError(f"data.path '{path}' is a file: dfmkit trains on a folder written by `dfmkit prepare` "
                        "(Energon metadatasets and jsonl files are not read)")
    if not root.is_dir():
        raise DataError(f"dataset folder '{path}' does not exist; "
                        f"create it with `dfmkit prepare RECIPE --source ... --out {path}`")
    if not (root / ".nv-meta" / "split.yaml").is_file():
        raise DataError(f"'{path}' has no Energon index (.nv-meta/split.yaml); `dfmkit prepare` writes it, or run "
                        "dfmkit.data.prepare.index_dataset on the folder")
    _check_declaration(root)
    return read_dataset_info(root)


def _check_declaration(root: Path) -> None:
    """Refuse a folder whose ``.nv-meta/dataset.yaml`` is not :data:`~dfmkit.data.shards.ENERGON_DECLARATION`.

    Energon builds any object a declaration names (``__module__``/``__class__``/``__function__``, at any depth,
    e.g. under ``subflavors``) and imports a ``sample_loader`` Python file it names: a downloaded dataset could run
    code the moment it is opened. The file is read as plain data with PyYAML's safe loader, then with Energon's own
    reader (plain data too), so the check also sees what Energon would build from. The other files Energon reads
    from the folder (``split.yaml``, ``.info.json``) it reads as plain data, without building objects.
    """
    import yaml
    from megatron.energon.eyaml import load_yaml

    declaration = root / ".nv-meta" / "dataset.yaml"
    fix = (f"if you trust its shards, re-index the folder with dfmkit.data.prepare.index_dataset('{root}') (or "
           "prepare it again with `dfmkit prepare`), which writes the plain declaration")
    try:
        found = yaml.safe_load(declaration.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{declaration} is missing; {fix}") from None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        why = " ".join(str(exc).split())
        raise DataError(f"{declaration} is not plain YAML ({type(exc).__name__}: {why[:200]}); {fix}") from None
    if found != ENERGON_DECLARATION or load_yaml(declaration.read_bytes()) != ENERGON_DECLARATION:
        raise DataError(f"{declaration} is not the plain dataset declaration dfmkit opens "
                        f"({', '.join(f'{k}: {v}' for k, v in ENERGON_DECLARATION.items())}, nothing else): Energon "
                        f"would build the objects it names, so it is not opened; {fix}")


def split_shards(path: str, split: str) -> dict[str, int]:
    """The shards that Energon's index puts in ``split`` of the prepared folder ``path``, with their samples."""
    import json

    import yaml

    root = Path(path)
    try:
        splits = yaml.safe_load((root / ".nv-meta" / "split.yaml").read_text())
        counts = json.loads((root / ".nv-meta" / ".info.json").read_text())["shard_counts"]
    except (OSError, ValueError, KeyError):
        return {}
    import braceexpand

    names = [n for pattern in splits.get("split_parts", {}).get(split, []) or [] for n in braceexpand.braceexpand(pattern)]
    return {n: int(counts.get(n, 0)) for n in names}


def split_samples(path: str, split: str) -> int:
    """Samples that Energon's index puts in ``split`` of the prepared folder ``path``."""
    return sum(split_shards(path, split).values())


def check_sample_sizes(recipe: Any, info: Mapping[str, Any], split: str, pad_multiple: int, what: str) -> None:
    """A :class:`DataError` if even the smallest sample of ``split`` (as ``dfmkit prepare`` recorded its latent
    shapes in ``dfmkit.json``) makes more tokens than a pack holds with the recipe's patches and ``pad_multiple``;
    a warning if the largest does (those are skipped as ``too_long``)."""
    shapes = (info.get("latent_shapes") or {}).get(split)
    if not shapes:
        return
    patch_spatial, patch_temporal = patch_sizes(recipe.model.options)
    per_token = patch_temporal * patch_spatial * patch_spatial
    seq_length = int(recipe.data.seq_length)

    def tokens(shape: list[int]) -> int:
        _, t, h, w = (int(x) for x in shape)
        return round_up(-(-t * h * w // per_token), pad_multiple)

    how = (f"with the recipe's {patch_temporal}x{patch_spatial}x{patch_spatial} patches and padding to a multiple "
           f"of {pad_multiple}")
    smallest, largest = tokens(shapes["smallest"]), tokens(shapes["largest"])
    if smallest > seq_length:
        raise DataError(f"the smallest sample of {what} (latent {list(shapes['smallest'])}) makes {smallest} tokens "
                        f"{how}, more than a pack holds (data.seq_length = {seq_length}): no sample fits; raise "
                        f"data.seq_length to at least {smallest}")
    if largest > seq_length:
        log.warning("samples of %s up to latent %s make up to %d tokens %s, more than a pack holds (data.seq_length = "
                    "%d): those are skipped as too_long", what, list(shapes["largest"]), largest, how, seq_length)


def _report_shards(path: str, split: str, info: Mapping[str, Any]) -> None:
    """Warn about the shards of ``split`` that cannot be read as indexed, before any is read."""
    damaged = info.get("damaged_shards") or {}
    for name, samples in split_shards(path, split).items():
        if name in damaged:
            why = damaged[name]
            log.warning("shard %s is damaged (%s): %d of its %d samples are read, the others are counted as "
                        "unreadable; re-copy or re-prepare it", name, why.get("problem"), why.get("intact", 0), samples)
        elif samples and (problem := index_problem(Path(path) / name, samples)):
            log.warning("shard %s: %s", name, problem)


def _in_split(shard: str, split: str) -> bool:
    """Whether ``shard`` belongs to ``split`` by the naming ``dfmkit prepare`` uses (others count as train)."""
    base = shard.split("/")[-1]
    named = next((s for s in ("train", "val", "test") if base.startswith(f"{s}-")), "train")
    return named == split


class DatasetChanged(DataError):
    """A loader state saved on a dataset whose index differs from this one's (``changes`` says how)."""

    def __init__(self, message: str, changes: list[str]):
        super().__init__(message)
        self.changes = changes


class EnergonLoader:
    """Packed batches from an Energon-indexed folder; an iterator with savable state."""

    def __init__(
        self,
        recipe: Any,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        pad_multiple: int = 1,
        task_encoder: Any = None,
        split: str = "train",
        repeat: bool = True,
        shuffle: bool = True,
        num_workers: int | None = None,
    ):
        data = recipe.data
        self.recipe = recipe
        self.path = data.path
        self.split = split
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.pad_multiple = int(pad_multiple)
        self.repeat = repeat
        self.shuffle = shuffle
        self.num_workers = data.num_workers if num_workers is None else int(num_workers)
        self.dataset_info = _check_dataset(self.path, split)
        info = self.dataset_info or {}
        check_fits_model(recipe, info, f"the dataset '{self.path}'")
        self.shards = split_shards(self.path, split)  # the split's index: samples by shard
        if not sum(self.shards.values()):
            raise DataError(f"the '{split}' split of '{self.path}' holds no samples (see .nv-meta/split.yaml)")
        check_sample_sizes(recipe, info, split, self.pad_multiple, f"the '{split}' split of '{self.path}'")
        self.skips = SkipCounter()
        if self.dp_rank == 0:  # said and counted once, not once per rank
            _report_shards(self.path, split, info)
            for name, why in (info.get("excluded_shards") or {}).items():
                if not _in_split(name, split):
                    continue
                if int(why.get("samples", 0)):
                    self.skips.count("unreadable", name, f"shard left out of the index: {why.get('problem')}",
                                     n=int(why["samples"]))
                else:
                    log.warning("shard %s was left out of the index (%s); how many samples it held is not known",
                                name, why.get("problem"))
        self._component = task_encoder
        children_die_with_this_process()  # the worker processes must not outlive a killed run
        self.samples = 0  # samples delivered (this process)
        self.batches = 0
        self.last_metadata: list[dict] = []
        self._loader: Any = None
        self._iterator: Iterator[Any] | None = None
        self._rewound: dict[str, Any] | None = None  # the state of a rewind, restored at the next batch
        self._build()

    def _task_encoder(self) -> Any:
        context = dict(recipe=self.recipe, pad_multiple=self.pad_multiple, skips=self.skips,
                       dataset_info=self.dataset_info or {})
        if self._component is not None:
            return self._component.build(**context)
        from dfmkit.components.task_encoders import PackedOptions
        from dfmkit.components.task_encoders.packed import build

        return build(PackedOptions(), **context)

    def _build(self) -> None:
        from megatron.energon import WorkerConfig, get_savable_loader, get_train_dataset, get_val_dataset

        data = self.recipe.data
        worker_config = WorkerConfig(
            rank=self.dp_rank, world_size=self.dp_size, num_workers=self.num_workers,
            seed_offset=int(getattr(self.recipe.train, "seed", 0)),
            global_error_handler=_error_handler(self.skips),
        )
        task_encoder = self._task_encoder()
        if self.shuffle:
            dataset = get_train_dataset(
                self.path, split_part=self.split, worker_config=worker_config, batch_size=None,
                shuffle_buffer_size=data.shuffle_buffer_size or None,
                max_samples_per_sequence=data.max_samples_per_sequence,
                packing_buffer_size=data.packing_buffer_size, task_encoder=task_encoder, repeat=self.repeat,
            )
        else:
            dataset = get_val_dataset(
                self.path, split_part=self.split, worker_config=worker_config, batch_size=None,
                packing_buffer_size=data.packing_buffer_size, task_encoder=task_encoder,
            )
        if not harden_readers(dataset, self.skips):
            log.warning("no Energon webdataset reader found to guard against unreadable shards")
        self.task_encoder = task_encoder
        self._loader = get_savable_loader(dataset)
        self._iterator = None
        self._fresh = True

    def __iter__(self) -> EnergonLoader:
        return self

    def _next_pack(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self._loader)
        if self._fresh:
            self._fresh = False
            with warnings.catch_warnings():  # torch warns that pin_memory has no effect without a GPU
                warnings.filterwarnings("ignore", message=".*pin_memory.*", category=UserWarning)
                return next(self._iterator)
        return next(self._iterator)

    def __next__(self) -> PackedBatch:
        if self._rewound is not None:
            self.restore_state(self._rewound)
        try:
            pack = self._next_pack()
        except NoUsableSamples as exc:  # raised in a worker, or here when there are none
            self.close()
            raise DataError(NoUsableSamples.message_of(exc)) from None
        self.skips.add(getattr(pack, "skipped", ()))
        batch = pack.to_batch()
        self.last_metadata = pack.meta  # the json of each sample of the batch just returned (captions, sizes)
        self.samples += batch.num_samples
        self.batches += 1
        return batch

    def save_state(self) -> dict[str, Any]:
        """This rank's loader position and skip counts, as JSON-ready data."""
        if self._rewound is not None:
            return self._rewound
        return self._state(self._loader.save_state_rank(), self.samples, self.batches, self.skips.state())

    def _state(self, energon: Any, samples: int, batches: int, skips: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "kind": "energon", "path": str(self.path), "split": self.split,
            "dp_rank": self.dp_rank, "dp_size": self.dp_size, "num_workers": self.num_workers,
            "samples": samples, "batches": batches, "skips": skips, "shards": self.shards,
            "energon": None if energon is None else state_to_json(energon),
        }

    def position(self) -> tuple[Any, ...]:
        """Where the loader is now: cheap enough for every step (no question to the worker processes)."""
        if self._rewound is not None:
            self.restore_state(self._rewound)
        return loader_position(self._loader), self.samples, self.batches, self.skips.recorded

    def rewind(self, position: tuple[Any, ...]) -> None:
        """Go back to ``position`` (of :meth:`position`): the batches delivered since come again, and the counts and
        :meth:`save_state` are those of then. The worker processes are asked where they were then (they answer
        between samples; one that does not within :data:`WORKER_ANSWER_S` is a TimeoutError). They are replaced
        only when the next batch is asked for: a run that stops after the rewind does not wait for them."""
        energon, samples, batches, skip_records = position
        self._rewound = self._state(state_at(self._loader, energon, WORKER_ANSWER_S), samples, batches,
                                    self.skips.state(skip_records))
        self.samples, self.batches = samples, batches
        self.skips.load(self._rewound["skips"])

    def restore_state(self, state: Mapping[str, Any] | None) -> None:
        """Continue from a :meth:`save_state` result (same recipe, DP layout and worker count)."""
        if not state:
            return
        self._rewound = None
        if state.get("format") != STATE_FORMAT or state.get("kind") != "energon":
            raise DataError(f"not an Energon loader state of this dfmkit version: {str(state)[:120]}")
        self._check_same_dataset(state)
        for key, mine in (("dp_rank", self.dp_rank), ("dp_size", self.dp_size), ("num_workers", self.num_workers)):
            if int(state[key]) != mine:
                raise DataError(f"loader state was saved with {key}={state[key]}, this run has {key}={mine}; "
                                "resume with the same data-parallel size and data.num_workers")
        if self._iterator is not None:
            self.close()
            self._build()
        self.skips.load(state.get("skips", {}))
        self.samples, self.batches = int(state.get("samples", 0)), int(state.get("batches", 0))
        if state.get("energon") is not None:
            self._loader.restore_state_rank(state_from_json(state["energon"]))

    def _check_same_dataset(self, state: Mapping[str, Any]) -> None:
        """Raise :class:`DatasetChanged` unless ``state`` was saved on a split with this one's index (shard names and
        samples; a state that does not record it is taken as it is)."""
        saved = state.get("shards")
        if saved is None:
            return
        changes = [] if state.get("split") == self.split else [f"the split was '{state.get('split')}'"]
        for name in sorted(set(saved) | set(self.shards)):
            then, now = saved.get(name), self.shards.get(name)
            if then is None:
                changes.append(f"shard {name} is new ({now} samples)")
            elif now is None:
                changes.append(f"shard {name} ({then} samples) is gone")
            elif then != now:
                changes.append(f"shard {name} held {then} samples, now {now}")
        moved = str(state.get("path")) != str(self.path)
        if not changes:
            if moved and self.dp_rank == 0:
                log.info("the data position saved on '%s' goes on in '%s', whose index is the same", state.get("path"),
                         self.path)
            return
        listed = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
        read_from = f" (that was read from '{state.get('path')}')" if moved else ""
        raise DatasetChanged(
            f"the '{self.split}' split of '{self.path}' is not the data the saved position belongs to{read_from}: "
            f"{listed} ({len(saved)} shards with {sum(saved.values())} samples then, {len(self.shards)} with "
            f"{sum(self.shards.values())} now)", changes)

    def close(self) -> None:
        """Stop the worker processes."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()
        shutdown_workers(self._loader)


def build_train_loader(
    job: Any,
    dp_rank: int = 0,
    dp_size: int = 1,
    pad_multiple: int | None = None,
    *,
    split: str = "train",
    repeat: bool = True,
    num_workers: int | None = None,
):
    """Packed training batches for data-parallel rank ``dp_rank`` of ``dp_size``.

    ``job`` is a :class:`dfmkit.Job` (its ``task_encoder`` component is used) or a Recipe (the
    built-in ``packed`` encoder). ``pad_multiple`` defaults to what the recipe's parallel layout
    needs (:func:`default_pad_multiple`). With ``data.mock`` the batches are random
    (:class:`~dfmkit.data.mock.MockLoader`).
    """
    recipe, component = _recipe_and_task_encoder(job)
    if pad_multiple is None:
        pad_multiple = default_pad_multiple(recipe)
    if recipe.data.mock:
        return MockLoader(recipe, dp_rank=dp_rank, dp_size=dp_size, pad_multiple=pad_multiple)
    return EnergonLoader(recipe, dp_rank=dp_rank, dp_size=dp_size, pad_multiple=pad_multiple,
                         task_encoder=component, split=split, repeat=repeat, num_workers=num_workers)


def build_validation_batches(
    job: Any,
    dp_rank: int = 0,
    dp_size: int = 1,
    pad_multiple: int | None = None,
    *,
    count: int = 2,
) -> list[PackedBatch]:
    """``count`` fixed packed batches for validation: from the 'val' split, else 'train', unshuffled."""
    recipe, component = _recipe_and_task_encoder(job)
    if pad_multiple is None:
        pad_multiple = default_pad_multiple(recipe)
    if count <= 0:
        return []
    if recipe.data.mock:
        loader = MockLoader(recipe, dp_rank=dp_rank, dp_size=dp_size, pad_multiple=pad_multiple,
                            seed=int(getattr(recipe.train, "seed", 0)) + 7919)
        return [next(loader) for _ in range(count)]
    _check_dataset(recipe.data.path, "val")
    split = "val" if split_samples(recipe.data.path, "val") else "train"
    loader = EnergonLoader(recipe, dp_rank=dp_rank, dp_size=dp_size, pad_multiple=pad_multiple,
                           task_encoder=component, split=split, repeat=False, shuffle=False, num_workers=0)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) >= count:
            break
    loader.close()
    return batches


def default_pad_multiple(recipe: Any) -> int:
    """The per-sample token multiple the recipe's parallel layout needs (:func:`dfmkit.parallel.required_pad_multiple`)."""
    return required_pad_multiple(recipe.parallel)
