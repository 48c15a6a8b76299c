"""``dfmkit prepare``: encode a source into WebDataset shards that the training loader reads at once.

For every item of the source (see :mod:`dfmkit.data.sources`) the recipe's tokenizer encodes the
resized pixels into a latent and the recipe's text encoder encodes the caption into states at
their true length; both are written, dtype kept, with json metadata (layout in
:mod:`dfmkit.data.shards`). Items that fail (unreadable file, no caption, non-finite latent, bad
text states) are skipped and counted by reason, never fatal.

Under ``torchrun`` each rank encodes a contiguous slice of the source and writes its own shards
(``<split>-r<rank>-<n>.tar``); rank 0 then writes ``dfmkit.json`` and Energon's index
(non-interactively, ``CrudeWebdataset``), so ``data.path = OUT`` trains right away.

Samples go to the train/val/test split by a low-discrepancy (golden-ratio) sequence over their
global index: the split sizes follow the ratio closely even for small sets, and a sample's split
does not depend on the number of ranks.

Python API: :func:`prepare` (returns a :class:`PrepareResult`) and :func:`index_dataset`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from dfmkit.compat.energon import index_damaged_shards, scan_tar
from dfmkit.components.text_encoders.cache import EmbeddingCache
from dfmkit.data.shards import (
    DATASET_FORMAT,
    DATASET_INFO,
    ENERGON_DECLARATION,
    FORMATS,
    ShardWriter,
    read_dataset_info,
)
from dfmkit.data.skips import SkipCounter, SkipError, report
from dfmkit.data.sources import ResizeOptions, Source, open_source
from dfmkit.errors import DfmkitError

log = logging.getLogger("dfmkit.data")

SPLITS = ("train", "val", "test")
_GOLDEN = 0.6180339887498949


class PrepareError(DfmkitError):
    """A prepare run that cannot start (bad output folder, bad split, components that do not fit)."""


@attrs.define
class PrepareResult:
    out: Path
    samples: dict[str, int]  # per split, all ranks
    skips: dict[str, int]  # per reason, all ranks
    shards: list[str]  # this rank's shard files
    seconds: float

    @property
    def total(self) -> int:
        return sum(self.samples.values())


def parse_split(value: str | Sequence[float]) -> tuple[float, float, float]:
    """'0.9,0.05,0.05' or [0.9, 0.05, 0.05] -> normalised (train, val, test) ratios."""
    try:
        parts = [float(x) for x in (value.split(",") if isinstance(value, str) else value)]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise PrepareError(f"split must be three non-negative numbers train,val,test like 0.9,0.05,0.05, got {value!r}")
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


def split_of(index: int, ratios: Sequence[float]) -> str:
    """The split of the sample with global ``index`` (deterministic, independent of ranks)."""
    fraction = (index * _GOLDEN) % 1.0
    edge = 0.0
    for name, ratio in zip(SPLITS, ratios):
        edge += ratio
        if fraction < edge:
            return name
    return next(name for name, ratio in zip(reversed(SPLITS), reversed(ratios)) if ratio > 0)


def rank_slice(n: int, rank: int, world_size: int) -> range:
    """The contiguous part of ``range(n)`` that ``rank`` encodes (the last rank takes the remainder)."""
    per = n // world_size
    start = rank * per
    return range(start, n if rank == world_size - 1 else start + per)


# --------------------------------------------------------------------------------------------
# Energon index
# --------------------------------------------------------------------------------------------


def _problem(scan: Any) -> str:
    return scan.problem or f"it ends after {len(scan.keys)} samples"


def _previous_counts(root: Path, info: dict[str, Any]) -> dict[str, int]:
    """The samples each shard should hold: as ``dfmkit prepare`` wrote them (``shard_samples`` in ``dfmkit.json``)
    or as an earlier index counted them, whichever is more."""
    from megatron.energon.flavors.webdataset.config import INFO_JSON_FILENAME, MAIN_FOLDER_NAME

    counts = {name: int(n) for name, n in (info.get("shard_samples") or {}).items()}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        indexed = json.loads((root / MAIN_FOLDER_NAME / INFO_JSON_FILENAME).read_text())["shard_counts"]
        for name, n in indexed.items():
            counts[name] = max(counts.get(name, 0), int(n))
    return counts


def index_dataset(path: str | os.PathLike[str], split: str | Sequence[float] | None = None, workers: int = 0) -> dict[str, int]:
    """Write (or rewrite) Energon's index of the tar shards under ``path``, non-interactively.

    Shards named ``train-*``, ``val-*`` and ``test-*`` (as :func:`prepare` writes them) go to
    that split. A folder with other shard names is split by shard with ``split`` (default all
    train), as ``energon prepare --split-ratio`` does. Returns the sample count per shard.

    A damaged shard (cut off, a damaged header, or fewer samples than ``dfmkit prepare`` wrote into it or an earlier
    index counted) keeps its intact samples: they are indexed (:func:`dfmkit.compat.energon.index_damaged_shards`),
    and the shard is indexed with the samples it should hold, so that the loader counts each lost one as
    ``unreadable``. Such shards are logged and listed under ``damaged_shards`` in ``dfmkit.json``. A shard with no
    sample found and none known is left out of the index (``excluded_shards``). ``shard_samples`` in ``dfmkit.json``
    keeps the samples each shard should hold, for the next index to compare with.
    """
    from megatron.energon.flavors import BaseWebdatasetFactory
    from megatron.energon.flavors.webdataset.config import MAIN_FOLDER_NAME

    root = Path(path)
    tars = sorted(str(p.relative_to(root)) for p in root.rglob("*.tar"))
    if not tars:
        raise PrepareError(f"no .tar shards under {str(root)!r} to index")
    info = read_dataset_info(root) or {}
    known = _previous_counts(root, info)
    excluded, damaged, expected = {}, {}, {}
    for name in tars:
        with open(root / name, "rb") as file:
            scan = scan_tar(file)
        samples = max(known.get(name, 0), len(scan.keys) + scan.partial)
        if not samples:
            excluded[name] = {"problem": scan.problem, "samples": 0}
            log.warning("shard %s left out of the index (%s): no sample found in it", name, scan.problem)
            continue
        expected[name] = samples
        if scan.problem or len(scan.keys) < samples:
            damaged[name] = scan, samples
            log.warning("shard %s is damaged (%s): its %d intact samples are indexed, %d of its %d samples are lost "
                        "and counted as unreadable; re-copy or re-prepare it", name, _problem(scan), len(scan.keys),
                        samples - len(scan.keys), samples)
    clean = [name for name in tars if name in expected and name not in damaged]
    if not clean:  # Energon's indexer needs one shard it can read
        raise PrepareError(f"no .tar shard under {str(root)!r} can be read to its end "
                           f"({', '.join(sorted(damaged) + sorted(excluded))}); re-copy or re-prepare them")
    workers = workers or max(1, min(len(clean), os.cpu_count() or 1, 8))
    kwargs: dict[str, Any]
    if all(name.split("/")[-1].startswith(tuple(f"{s}-" for s in SPLITS)) for name in tars):
        kwargs = {"split_parts_patterns": [(s, rf"^(.*/)?{s}-.*\.tar$") for s in SPLITS]}
        split_of_damaged = {name: name.split("/")[-1].split("-", 1)[0] for name in damaged}
    else:
        ratios = parse_split(split if split is not None else (1, 0, 0))
        kwargs = {"split_parts_ratio": list(zip(SPLITS, ratios))}
        split_of_damaged = dict.fromkeys(damaged, "train")  # what is left of a damaged shard trains
    # Energon reports progress with print(); keep it out of our output.
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        BaseWebdatasetFactory.prepare_dataset(root, clean, workers=workers, progress_fn=lambda x, *_: x, **kwargs)
    log.debug("energon prepare: %s", captured.getvalue().strip())
    index_damaged_shards(root, {name: (scan, samples, split_of_damaged[name])
                                for name, (scan, samples) in damaged.items()})
    meta = root / MAIN_FOLDER_NAME
    (meta / "dataset.yaml").write_text("".join(f"{key}: {value}\n" for key, value in ENERGON_DECLARATION.items()))
    info["shard_samples"] = expected
    info["damaged_shards"] = {name: {"problem": _problem(scan), "samples": samples, "intact": len(scan.keys)}
                              for name, (scan, samples) in damaged.items()}
    info["excluded_shards"] = excluded
    with open(root / DATASET_INFO, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    with open(meta / ".info.json", encoding="utf-8") as f:
        return json.load(f)["shard_counts"]


# --------------------------------------------------------------------------------------------
# Distributed helpers (torchrun): each rank writes its own shards, rank 0 indexes
# --------------------------------------------------------------------------------------------


def _dist_info() -> tuple[int, int, bool]:
    """(rank, world_size, initialised_here) from torchrun's environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return rank, world_size, True


def _gather(value: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _check_latent(latent: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(latent.shape) != tuple(expected):
        raise SkipError("bad_latent", f"tokenizer gave {tuple(latent.shape)}, expected {tuple(expected)}")
    if not torch.isfinite(latent).all():
        raise SkipError("nonfinite", "the tokenizer's latent holds NaN or Inf")


def _check_text(text: Any, dim: int) -> torch.Tensor:
    if not isinstance(text, torch.Tensor) or text.ndim != 2 or text.shape[0] < 1 or text.shape[1] != dim:
        shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
        raise SkipError("bad_text", f"text encoder gave {shape}, expected [L >= 1, {dim}]")
    if not torch.isfinite(text).all():
        raise SkipError("bad_text", "text states hold NaN or Inf")
    return text


def widen_shapes(shapes: dict[str, dict[str, list[int]]], split: str, shape: list[int]) -> None:
    """Keep in ``shapes[split]`` the smallest and the largest latent shape [C, T, H, W] by T * H * W (the tokens a
    latent makes are in proportion to it, whatever the patches): the loader's check that a sample fits a pack."""
    extremes = shapes.setdefault(split, {"smallest": shape, "largest": shape})
    if math.prod(shape[1:]) < math.prod(extremes["smallest"][1:]):
        extremes["smallest"] = shape
    if math.prod(shape[1:]) > math.prod(extremes["largest"][1:]):
        extremes["largest"] = shape


def _valid_frames(frames: int, temporal_factor: int) -> int:
    """Frames a causal video tokenizer accepts: 1 + k * temporal_factor (all frames when it is 1)."""
    if temporal_factor <= 1:
        return frames
    return 1 + ((frames - 1) // temporal_factor) * temporal_factor


def _describe_component(component: Any, section: Any) -> dict[str, Any]:
    info = {"name": section.component.name, "origin": section.component.origin}
    identity = getattr(component, "identity", None)
    if identity is not None:
        info["identity"] = str(identity)
    try:
        import cattrs

        info["options"] = cattrs.unstructure(section.options)
    except Exception:
        pass
    return info


def _encode_chunk(
    items: list[tuple[int, Any]],
    tokenizer: Any,
    text_encoder: Any,
    skips: SkipCounter,
) -> list[tuple[int, Any, torch.Tensor, torch.Tensor]]:
    """(index, item, latent, text) for the items of one chunk that encode cleanly."""
    texts = text_encoder.encode([item.caption for _, item in items])
    if len(texts) != len(items):
        raise PrepareError(f"text encoder returned {len(texts)} results for {len(items)} captions")
    device = getattr(tokenizer, "device", None)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for position, (_, item) in enumerate(items):
        by_shape.setdefault(tuple(item.pixels.shape), []).append(position)
    latents: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for shape, positions in by_shape.items():
            pixels = torch.stack([items[p][1].pixels for p in positions])
            if device is not None:
                pixels = pixels.to(device)
            encoded = tokenizer.encode(pixels)
            for row, position in enumerate(positions):
                latents[position] = encoded[row].detach().to("cpu")
    out = []
    for position, (index, item) in enumerate(items):
        try:
            _, frames, height, width = item.pixels.shape
            _check_latent(latents[position], tokenizer.latent_shape(frames, height, width))
            text = _check_text(texts[position], text_encoder.dim)
        except SkipError as skip:
            skips.count(skip.reason, item.name, skip.detail)
            continue
        out.append((index, item, latents[position], text.detach().to("cpu")))
    return out


def _chunks(values: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk: list[Any] = []
    for value in values:
        chunk.append(value)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _existing_dataset(out: Path) -> list[Path]:
    return list(out.rglob("*.tar")) + list(out.glob(DATASET_INFO)) if out.is_dir() else []


def _clear_output(out: Path) -> None:
    for path in out.rglob("*.tar"):
        path.unlink()
    for path in list(out.rglob("*.tar.idx")) + list(out.rglob("*.tar.tmp")) + [out / DATASET_INFO]:
        path.unlink(missing_ok=True)
    shutil.rmtree(out / ".nv-meta", ignore_errors=True)


def prepare(
    recipe: Any,
    source: str | Source,
    out: str | os.PathLike[str],
    *,
    overrides: Iterable[str] = (),
    plugins: Any = None,
    split: str | Sequence[float] | None = None,
    fmt: str = "safetensors",
    shard_size: int = 1000,
    batch_size: int = 16,
    limit: int = 0,
    image_column: str = "",
    caption_column: str = "",
    overwrite: bool = False,
    index: bool = True,
) -> PrepareResult:
    """Encode ``source`` with the recipe's tokenizer and text encoder into shards under ``out``.

    ``recipe`` is anything :func:`dfmkit.build` takes (path, packaged name, dict, Recipe); resize
    options and the split come from its ``[data]`` section unless ``split`` is given. Works in one
    process or under torchrun (every rank calls it with the same arguments).
    """
    import dfmkit

    if fmt not in FORMATS:
        raise PrepareError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    started = time.perf_counter()
    job = dfmkit.build(recipe, overrides, plugins=plugins)
    data = job.recipe.data
    ratios = parse_split(split if split is not None else data.split)
    options = ResizeOptions(
        image_size=data.image_size, size_multiple=data.size_multiple, mode=data.resize_mode,
        max_frames=data.max_frames, fps=data.fps,
    )
    out = Path(out)
    existing = _existing_dataset(out)
    if existing and not overwrite:  # every rank sees the same folder, so every rank stops here
        raise PrepareError(f"{str(out)!r} already holds a dataset ({existing[0].name}, ...); pass --overwrite to replace it")
    rank, world_size, initialised = _dist_info()
    try:
        if world_size > 1 and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _clear_output(out)
        _barrier(world_size)

        src = source if not isinstance(source, str) else open_source(
            source, options, image_column=image_column, caption_column=caption_column
        )
        tokenizer = job.components["tokenizer"].build(recipe=job.recipe)
        # Captions repeat (class labels, species names): each distinct caption is encoded once.
        text_encoder = EmbeddingCache(job.components["text_encoder"].build(recipe=job.recipe))
        total = min(len(src), limit) if limit > 0 else len(src)
        mine = rank_slice(total, rank, world_size)
        log.info("prepare: rank %d/%d encodes items %d..%d of %s (%d in all)", rank, world_size,
                 mine.start, mine.stop - 1, getattr(src, "description", "source"), total)

        skips = SkipCounter()
        shapes: dict[str, dict[str, list[int]]] = {}
        writers = {s: ShardWriter(out, f"{s}-r{rank:03d}", max_samples=shard_size, fmt=fmt) for s in SPLITS}
        counts = dict.fromkeys(SPLITS, 0)
        temporal = int(getattr(tokenizer, "temporal_factor", 1))
        description = getattr(src, "description", str(source))

        def loaded() -> Iterable[tuple[int, Any]]:
            for i in mine:
                try:
                    item = src.load(i)
                    if not isinstance(item.caption, str) or not item.caption.strip():  # any source, plugins too
                        raise SkipError("no_caption", f"{item.name}: the caption is empty")
                except SkipError as skip:
                    skips.count(skip.reason, f"{description}[{i}]", skip.detail)
                    continue
                item.caption = item.caption.strip()
                frames = _valid_frames(item.pixels.shape[1], temporal)
                item.pixels = item.pixels[:, :frames]
                yield i, item

        done, last_log = 0, time.perf_counter()
        for chunk in _chunks(loaded(), max(1, batch_size)):
            for i, item, latent, text in _encode_chunk(chunk, tokenizer, text_encoder, skips):
                _, frames, height, width = item.pixels.shape
                meta = {
                    "caption": item.caption,
                    **item.meta,
                    "height": int(height), "width": int(width), "frames": int(frames),
                    "latent_shape": list(latent.shape),
                    "latent_dtype": str(latent.dtype).removeprefix("torch."),
                    "text_length": int(text.shape[0]),
                    "source": description, "source_item": item.name,
                }
                name = split_of(i, ratios)
                writers[name].write(f"{i:09d}", latent, text, meta)
                counts[name] += 1
                widen_shapes(shapes, name, list(latent.shape))
            done += len(chunk)
            if time.perf_counter() - last_log > 10:
                log.info("prepare: rank %d: %d/%d items", rank, done, len(mine))
                last_log = time.perf_counter()
        written = {str(p.relative_to(out)): n for w in writers.values() for p, n in zip(w.close(), w.counts)}
        shards = list(written)

        component_info = {
            "tokenizer": _describe_component(tokenizer, job.components["tokenizer"]),
            "text_encoder": _describe_component(text_encoder, job.components["text_encoder"]),
        }
        gathered = _gather({"counts": counts, "skips": skips.as_dict(), "written": written, "shapes": shapes},
                           world_size)
        all_counts = {s: sum(g["counts"][s] for g in gathered) for s in SPLITS}
        all_skips: dict[str, int] = {}
        all_shapes: dict[str, dict[str, list[int]]] = {}
        for g in gathered:
            for reason, n in g["skips"].items():
                all_skips[reason] = all_skips.get(reason, 0) + n
            for name, extremes in g["shapes"].items():
                for shape in extremes.values():
                    widen_shapes(all_shapes, name, shape)
        if rank == 0:
            info = {
                "format": DATASET_FORMAT,
                "dfmkit_version": dfmkit.__version__,
                "source": description,
                "samples": all_counts,
                "skipped": all_skips,
                "split": list(ratios),
                "tensor_format": fmt,
                "latent_channels": int(tokenizer.latent_channels),
                "spatial_factor": int(getattr(tokenizer, "spatial_factor", 1)),
                "temporal_factor": temporal,
                "text_dim": int(text_encoder.dim),
                "resize": attrs.asdict(options),
                "latent_shapes": all_shapes,
                "shard_samples": {name: n for g in gathered for name, n in g["written"].items()},
                **component_info,
            }
            with open(out / DATASET_INFO, "w", encoding="utf-8") as f:
                json.dump(info, f, indent=2, sort_keys=True)
            if index and sum(all_counts.values()):
                index_dataset(out)
        _barrier(world_size)
    finally:
        if initialised:
            import torch.distributed as dist

            dist.destroy_process_group()
    result = PrepareResult(out=out, samples=all_counts, skips=all_skips, shards=shards,
                           seconds=time.perf_counter() - started)
    if result.total == 0:
        raise PrepareError(f"no sample of {description} could be encoded ({report(all_skips)})")
    return result


def cmd_prepare(args: argparse.Namespace) -> int:
    """The ``dfmkit prepare`` command."""
    if not args.source or not args.out:
        raise PrepareError("dfmkit prepare needs --source and --out")
    result = prepare(
        args.recipe, args.source, args.out,
        overrides=args.overrides, split=args.split, fmt=args.format, shard_size=args.shard_size,
        batch_size=args.batch_size, limit=args.limit, image_column=args.image_column or "",
        caption_column=args.caption_column or "", overwrite=args.overwrite,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        samples = ", ".join(f"{s} {n}" for s, n in result.samples.items() if n)
        print(f"wrote {result.total} samples ({samples}) to {result.out} in {result.seconds:.1f} s; "
              f"{report(result.skips)}")
        print(f"train on it with: data.path={result.out}")
    return 0
