"""Generation from a trained model: ``dfmkit generate``, :func:`load` and ``dfmkit.build(recipe).generate(...)``.

Where the weights come from (:func:`load` tells them apart):

- a **checkpoint** of ``dfmkit run`` (a ``checkpoint.dir`` with ``iter_NNNNNNN/`` folders, or one of
  them): its resolved recipe (in ``dfmkit.json``) gives the model, tokenizer, text encoder, sampler
  and defaults, and only the ``model`` and ``ema`` entries of megatron's distributed checkpoint are
  read (optimizer state is left on disk). megatron reshards on load, so a checkpoint saved with any
  tensor/context-parallel layout loads into the layout generation runs with.
- an **export** of ``dfmkit export`` (``config.json`` + ``ema.safetensors`` + ``model.safetensors``):
  plain safetensors, no distributed checkpoint; see :mod:`dfmkit.export`.

The EMA weights are used by default (``weights="model"`` takes the raw trained weights).

One call generates any number of prompts, each with its own size (``frames x height x width``
pixels; ``frames`` counts video frames, not latent frames), as ONE packed sequence (or several of
at most ``max_tokens`` latent tokens each): the text encoder encodes the prompts, the sampler
integrates all of them together with classifier-free guidance in one batched forward, and the
tokenizer decodes each latent. Output ``i`` starts from noise seeded with ``seed + i`` (whatever
else shares its pack), so ``--seed <seed + i>`` alone regenerates it. Each output is written as
``NNN.png`` (one frame) or ``NNN.mp4`` plus ``NNN.json`` with the exact settings.

Parallelism: run under torchrun with ``context`` > 1 (default: all processes) to split every
sample's tokens over several GPUs (context parallelism), or ``tensor`` > 1 for tensor parallelism.
Every rank samples; rank 0 decodes and writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from dfmkit.devices import resolve_device, resolve_precision
from dfmkit.errors import DfmkitError
from dfmkit.job import Job
from dfmkit.recipe import ParallelConfig, Recipe, load_recipe

WEIGHTS = ("ema", "model")


class GenerateError(DfmkitError):
    """Generation settings, prompts or sources that cannot work (the message says what to change)."""


# ============================================================================================
# Requests: prompts and sizes
# ============================================================================================


@attrs.frozen
class Request:
    """One output to generate: a prompt and its size in pixels (``frames`` video frames)."""

    prompt: str
    height: int
    width: int
    frames: int


@attrs.frozen
class Output:
    """One generated sample. ``pixels`` ``[3, T, H, W]`` in [-1, 1] and ``path`` are set on rank 0 only."""

    index: int
    prompt: str
    seed: int
    height: int
    width: int
    frames: int
    latent: torch.Tensor  # [C, T', H', W'] float32, CPU
    pixels: torch.Tensor | None
    path: Path | None
    settings: dict[str, Any]


def read_prompt_file(path: str | os.PathLike[str]) -> list[str | dict[str, Any]]:
    """Prompts from a file: one per line (blank lines skipped), or, for ``.jsonl``, one JSON object per
    line with ``"prompt"`` and optionally ``"height"``, ``"width"`` and ``"frames"``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GenerateError(f"cannot read the prompt file '{path}': {exc.strerror or exc}") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line]
    if not lines:
        raise GenerateError(f"the prompt file '{path}' holds no prompts (it is empty or only blank lines); "
                            "write one prompt per line")
    if path.suffix.lower() != ".jsonl":
        return [line for _, line in lines]
    prompts: list[str | dict[str, Any]] = []
    for number, line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GenerateError(f"{path}:{number}: not a JSON object ({exc.msg}); a .jsonl prompt file holds lines "
                                'such as {"prompt": "a red car", "height": 256, "width": 256}') from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise GenerateError(f'{path}:{number}: each line needs a "prompt" string, got {line[:80]!r}')
        unknown = set(item) - {"prompt", "height", "width", "frames"}
        if unknown:
            raise GenerateError(f"{path}:{number}: unknown keys {sorted(unknown)}; use prompt, height, width, frames")
        prompts.append(item)
    return prompts


def _per_prompt(name: str, value: int | Sequence[int] | None, count: int) -> list[int | None]:
    if value is None:
        return [None] * count
    if isinstance(value, int):
        return [value] * count
    values = list(value)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise GenerateError(f"{len(values)} values of {name} for {count} prompts: give one value for all prompts "
                            "or one per prompt")
    return values


def make_requests(
    prompts: str | Sequence[str | Mapping[str, Any]],
    *,
    height: int | Sequence[int] | None,
    width: int | Sequence[int] | None,
    frames: int | Sequence[int] | None,
    defaults: tuple[int, int, int],
) -> list[Request]:
    """Requests for ``prompts`` (strings, or mappings with "prompt" and optional sizes); a size given per
    prompt in a mapping wins over ``height``/``width``/``frames`` (one value, or one per prompt), which
    win over ``defaults`` (frames, height, width)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise GenerateError("no prompts: give at least one prompt (--prompt TEXT or --prompt-file FILE)")
    sizes = {"height": _per_prompt("height", height, len(prompts)),
             "width": _per_prompt("width", width, len(prompts)),
             "frames": _per_prompt("frames", frames, len(prompts))}
    default = {"frames": defaults[0], "height": defaults[1], "width": defaults[2]}
    requests = []
    for i, item in enumerate(prompts):
        spec = dict(item) if isinstance(item, Mapping) else {"prompt": item}
        if not isinstance(spec.get("prompt"), str):
            raise GenerateError(f"prompt {i} is not a string: {spec.get('prompt')!r}")
        values = {}
        for key in ("height", "width", "frames"):
            value = spec.get(key, sizes[key][i])
            value = default[key] if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenerateError(f"prompt {i}: {key} must be a positive integer, got {value!r}")
            values[key] = value
        requests.append(Request(prompt=spec["prompt"], **values))
    return requests


# ============================================================================================
# Sizes: the tokenizer's alignment and the backbone's patches
# ============================================================================================


def _fit(tokenizer: Any, p: int, pt: int, frames: int, height: int, width: int) -> tuple[tuple[int, ...] | None, str]:
    try:
        shape = tuple(int(s) for s in tokenizer.latent_shape(frames, height, width))
    except (DfmkitError, ValueError) as exc:
        return None, str(exc)
    _, t, h, w = shape
    if t % pt or h % p or w % p:
        return None, (f"its latent {shape} (C, T, H, W) does not divide into the backbone's patches of "
                      f"{pt} x {p} x {p} (t x h x w)")
    return shape, ""


def _reference_size(tokenizer: Any, p: int, pt: int) -> tuple[int, int] | None:
    """Some (frames, side) that fits, to test one dimension at a time."""
    for side in range(8, 1025, 8):
        for frames in range(1, 129):
            if _fit(tokenizer, p, pt, frames, side, side)[0] is not None:
                return frames, side
    return None


def _nearest(test, value: int, limit: int) -> list[int]:
    below = next((v for v in range(value - 1, max(value - limit, 0), -1) if test(v)), None)
    above = next((v for v in range(value + 1, value + limit + 1) if test(v)), None)
    return [v for v in (below, above) if v is not None]


def latent_shape_for(tokenizer: Any, patch_spatial: int, patch_temporal: int, frames: int, height: int,
                     width: int, tokenizer_name: str = "") -> tuple[int, int, int, int]:
    """The latent (C, T, H, W) of a ``frames x height x width`` video, or a :class:`GenerateError` naming
    the sizes that do not fit and the nearest ones that do."""
    p, pt = patch_spatial, patch_temporal
    shape, reason = _fit(tokenizer, p, pt, frames, height, width)
    if shape is not None:
        return shape  # type: ignore[return-value]
    name = tokenizer_name or getattr(tokenizer, "name", type(tokenizer).__name__)
    message = (f"size {frames} frames x {height} x {width} (height x width) does not fit the '{name}' tokenizer "
               f"with the backbone's {pt} x {p} x {p} patches: {reason}")
    reference = _reference_size(tokenizer, p, pt)
    if reference is not None:
        ref_frames, ref_side = reference
        tests = {
            "height": (height, 1024, lambda v: _fit(tokenizer, p, pt, ref_frames, v, ref_side)[0] is not None),
            "width": (width, 1024, lambda v: _fit(tokenizer, p, pt, ref_frames, ref_side, v)[0] is not None),
            "frames": (frames, 256, lambda v: _fit(tokenizer, p, pt, v, ref_side, ref_side)[0] is not None),
        }
        hints = []
        for dim, (value, limit, test) in tests.items():
            if not test(value):
                near = _nearest(test, value, limit)
                hints.append(f"{dim} {value} -> {' or '.join(str(v) for v in near) or 'none nearby'}")
        if hints:
            message += ". Nearest valid sizes: " + "; ".join(hints)
    raise GenerateError(message)


# ============================================================================================
# Sources: checkpoints and exports
# ============================================================================================


def resolve_source(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """("export", folder) or ("checkpoint", iteration folder) for ``path``; a clear error otherwise."""
    from dfmkit import export as export_module
    from dfmkit.train import checkpoint as ckpt

    path = Path(path)
    if not path.exists():
        raise GenerateError(f"checkpoint '{path}' does not exist; give a checkpoint folder of `dfmkit run` "
                            "(checkpoint.dir or one of its iter_* folders) or an export folder of `dfmkit export`")
    if export_module.is_export(path):
        return "export", path
    found = ckpt.find_checkpoint(path)
    if found is None:
        partial = sorted(p.name for p in path.glob("iter_*")) + sorted(p.name for p in path.glob(".tmp_iter_*"))
        detail = (f"; it has {', '.join(partial[:5])} without {ckpt.MARKER} (a save that did not finish)"
                  if partial else "")
        raise GenerateError(
            f"'{path}' holds no complete checkpoint: a complete one is an iter_NNNNNNN folder with {ckpt.MARKER} "
            f"(written last by a save){detail}. Point --checkpoint at a checkpoint.dir of `dfmkit run`, one of its "
            "iter_* folders, or a folder written by `dfmkit export`")
    return "checkpoint", found


def checkpoint_recipe_data(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the recipe as TOML data, the marker) of a complete checkpoint."""
    from dfmkit.train import checkpoint as ckpt

    marker = ckpt.read_marker(checkpoint)
    text = marker.get("recipe")
    if not isinstance(text, str):
        raise GenerateError(f"{checkpoint / ckpt.MARKER} holds no recipe; it was not written by dfmkit's trainer")
    try:
        return tomllib.loads(text), marker
    except tomllib.TOMLDecodeError as exc:
        raise GenerateError(f"the recipe in {checkpoint / ckpt.MARKER} is not valid TOML: {exc}") from None


def _flatten(node: Any, out: dict[str, Any]) -> dict[str, Any]:
    for key, value in node.items():
        if isinstance(value, dict):
            _flatten(value, out)
        else:
            out[key] = value
    return out


def read_checkpoint_states(
    model: torch.nn.Module, checkpoint: Path, which: Sequence[str] = WEIGHTS
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"model": {name: tensor}, "ema": {...}}``: this rank's shards (in the model's current layout) of
    the raw and EMA weights in ``checkpoint``, under plain ``model.state_dict()`` names, in the dtypes they
    were saved in. Only those entries are read from megatron's distributed checkpoint."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from dfmkit.compat.torch_dcp import restricted_metadata
    from dfmkit.errors import CheckpointError

    sharded = {k: v for k, v in _flatten(model.sharded_state_dict(prefix="model."), {}).items()
               if isinstance(v, ShardedTensor)}
    try:
        with restricted_metadata():
            saved = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    except CheckpointError:
        raise
    except Exception as exc:  # megatron raises several kinds for unreadable folders
        raise GenerateError(f"{checkpoint} is not a readable megatron distributed checkpoint "
                            f"({type(exc).__name__}: {str(exc)[:300]})") from None
    trained = {id(p) for p in model.parameters() if p.requires_grad}  # what the EMA covers (dfmkit.train.ema)
    request: dict[str, dict[str, ShardedTensor]] = {}
    problems = []
    for entry in which:
        prefix = "" if entry == "model" else f"{entry}."
        request[entry] = {}
        for name, sh in sharded.items():
            if entry == "ema" and id(sh.data) not in trained:
                continue
            key = prefix + sh.key
            meta = saved.get(key)
            if meta is None:
                problems.append(f"missing {key}")
                continue
            if tuple(meta.global_shape) != tuple(sh.global_shape):
                problems.append(f"{key} has shape {tuple(meta.global_shape)}, the model's is {tuple(sh.global_shape)}")
                continue
            buffer = torch.empty(sh.local_shape, dtype=meta.dtype, device=sh.data.device)
            request[entry][name] = dataclasses.replace(sh, key=key, data=buffer, dtype=meta.dtype)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise GenerateError(f"{checkpoint} does not fit the model of its recipe: {shown}")
    with restricted_metadata():
        loaded = dist_checkpointing.load(request, str(checkpoint))
    return {entry: {name[len("model."):]: tensor for name, tensor in loaded[entry].items()} for entry in which}


def slice_for_layout(model: torch.nn.Module, full: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """This rank's pieces of FULL (tensor-parallel gathered) weights ``full``, under ``model.state_dict()``
    names, for the model's current tensor-parallel layout (the identity at tensor parallelism 1)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sharded = {k: v for k, v in _flatten(model.sharded_state_dict(prefix=""), {}).items()
               if isinstance(v, ShardedTensor)}
    missing = sorted(set(sharded) - set(full))
    unexpected = sorted(set(full) - set(sharded))
    problems = [f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")] if missing else []
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    local = {}
    for name, sh in sharded.items():
        if name not in full:
            continue
        tensor = full[name]
        expected = tuple(sh.global_shape[sh.prepend_axis_num:])
        if tuple(tensor.shape) != expected:
            problems.append(f"{name} has shape {tuple(tensor.shape)}, the model's is {expected}")
            continue
        offsets = sh.global_offset[sh.prepend_axis_num:]
        for dim, (offset, size) in enumerate(zip(offsets, sh.local_shape)):
            if size != tensor.shape[dim]:
                tensor = tensor.narrow(dim, offset, size)
        local[name] = tensor
    if problems:
        raise GenerateError(f"{source} does not fit the model of its recipe: " + "; ".join(problems[:6]))
    return local


def assign_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model; every parameter and buffer must be there (megatron's ``_extra_state``
    entries, which hold no tensors, are not needed)."""
    wanted = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    missing = sorted(wanted - set(state))
    if missing:
        raise GenerateError(f"weights for {', '.join(missing[:5])} are missing")
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False)


# ============================================================================================
# The generator
# ============================================================================================


def generation_parallel(tensor: int = 1, context: int | None = None) -> ParallelConfig:
    """The layout generation runs with: ``tensor`` x ``context`` (default: the processes left over)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if tensor < 1 or world % tensor:
        raise GenerateError(f"tensor parallelism {tensor} does not divide the {world} processes")
    context = world // tensor if context is None else context
    if context < 1 or world % (tensor * context):
        raise GenerateError(f"{world} processes cannot run tensor {tensor} x context {context}")
    return ParallelConfig(tensor=tensor, context=context)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Generator:
    """A model loaded for sampling, with its recipe; :meth:`generate` makes images and videos.

    Build one with :func:`load`. The text encoder and tokenizer are built on first use and kept
    (``keep_text_encoder=False`` drops the text encoder after each encoding, to save memory).
    """

    def __init__(self, job: Job, model: torch.nn.Module, *, source: dict[str, Any], weights: str,
                 device: torch.device, model_dtype: torch.dtype, env: Any, overrides: Sequence[str] = (),
                 keep_text_encoder: bool = True):
        from dfmkit.diffusion.edm import EDM

        self.job = job
        self.recipe: Recipe = job.recipe
        self.model = model
        self.source = source
        self.weights = weights
        self.device = device
        self.model_dtype = model_dtype
        self.env = env
        self.overrides = list(overrides)
        self.keep_text_encoder = keep_text_encoder
        self.edm = EDM.from_config(self.recipe.diffusion)
        self._text_encoder = None
        self._tokenizer = None

    def __repr__(self) -> str:
        return (f"Generator({self.recipe.model.name}, {self.source['kind']} {self.source['path']}, "
                f"weights={self.weights}, device={self.device}, dtype={self.model_dtype})")

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.job.components["tokenizer"].build(recipe=self.recipe)
        return self._tokenizer

    def encode_prompts(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        encoder = self._text_encoder or self.job.components["text_encoder"].build(recipe=self.recipe)
        states = [s.float().cpu() for s in encoder.encode(list(prompts))]
        self._text_encoder = encoder if self.keep_text_encoder else None
        text_dim = getattr(self.recipe.model.options, "text_dim", None)
        if text_dim is not None and states and states[0].shape[-1] != text_dim:
            raise GenerateError(
                f"the text encoder '{self.recipe.text_encoder.name}' gives states of width {states[0].shape[-1]}, the "
                f"model was trained on width {text_dim} (model.text_dim); use the text encoder it was trained with")
        return states

    def _patches(self) -> tuple[int, int]:
        options = self.recipe.model.options
        return int(getattr(options, "patch_spatial", 1)), int(getattr(options, "patch_temporal", 1))

    def sampler_for(self, name: str | None = None, steps: int | None = None) -> tuple[str, Any, Any]:
        """(name, sampler, options): the recipe's sampler, or ``name`` (keeping the schedule options both
        have), with ``num_steps = steps`` when given."""
        section = self.recipe.sampler
        registry = self.job.plugins.registries.sampler
        name = name or section.name
        component = registry.get(name)
        options = section.options
        if name != section.name:
            target = attrs.fields_dict(component.options)
            shared = {f.name: getattr(options, f.name) for f in attrs.fields(type(options)) if f.name in target}
        else:
            shared = attrs.asdict(options, recurse=False)
        if steps is not None:
            if "num_steps" not in attrs.fields_dict(component.options):
                raise GenerateError(f"sampler '{name}' has no num_steps option; leave --steps out")
            shared["num_steps"] = steps
        try:
            options = component.options(**shared)
        except (TypeError, ValueError) as exc:
            raise GenerateError(f"sampler '{name}': {exc}") from None
        return name, component.build(options, recipe=self.recipe), options

    def _model_fn(self, x: torch.Tensor, c_noise: torch.Tensor, batch: Any) -> torch.Tensor:
        batch = batch if batch.text.dtype == self.model_dtype else batch.to(self.device, self.model_dtype)
        return self.model(x.to(self.model_dtype), c_noise, batch)


    def _packs(self, shapes: list[tuple[int, ...]], max_tokens: int, pad: int) -> list[list[int]]:
        """Indices of the outputs of each pack: in order, at most ``max_tokens`` latent tokens each (0: one pack)."""
        from dfmkit.batch import round_up

        p, pt = self._patches()
        packs: list[list[int]] = [[]]
        used = 0
        for i, (c, t, h, w) in enumerate(shapes):
            tokens = round_up((t // pt) * (h // p) * (w // p), pad)
            if max_tokens and packs[-1] and used + tokens > max_tokens:
                packs.append([])
                used = 0
            packs[-1].append(i)
            used += tokens
        return packs

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str | Mapping[str, Any]],
        *,
        height: int | Sequence[int] | None = None,
        width: int | Sequence[int] | None = None,
        frames: int | Sequence[int] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        out: str | os.PathLike[str] | None = None,
        fps: float = 24.0,
        max_tokens: int = 0,
    ) -> list[Output]:
        """Generate ``prompts`` (strings, or mappings with "prompt" and optional "height"/"width"/"frames").

        Sizes are pixels, ``frames`` video frames (one value for all prompts or one per prompt; default:
        the recipe's ``[validation]`` sizes). ``steps``/``sampler`` override the recipe's ``[sampler]``,
        ``guidance`` (w, 1 = none) and ``seed`` its ``[validation]`` values. ``max_tokens`` > 0 splits the
        prompts into several packs of at most that many latent tokens (0: one pack). With ``out`` each
        output is written as ``NNN.png``/``NNN.mp4`` + ``NNN.json`` (rank 0).
        """
        from dfmkit import __version__, parallel
        from dfmkit.inference import sample_latents, save_media, to_uint8_frames

        validation = self.recipe.validation
        requests = make_requests(prompts, height=height, width=width, frames=frames,
                                 defaults=(validation.frames, validation.height, validation.width))
        guidance = float(validation.guidance if guidance is None else guidance)
        if not math.isfinite(guidance):
            raise GenerateError(f"guidance must be a finite number, got {guidance!r}")
        seed = int(validation.seed if seed is None else seed)
        if max_tokens < 0:
            raise GenerateError(f"max_tokens must be >= 0, got {max_tokens}")
        sampler_name, sampler_obj, sampler_options = self.sampler_for(sampler, steps)
        p, pt = self._patches()
        tokenizer = self.tokenizer
        shapes = [latent_shape_for(tokenizer, p, pt, r.frames, r.height, r.width, self.recipe.tokenizer.name)
                  for r in requests]
        texts = self.encode_prompts([r.prompt for r in requests])
        pad = parallel.required_pad_multiple(ParallelConfig(tensor=self.env.tp_size, context=self.env.cp_size))

        def shard(batch, noise):
            return parallel.shard_for_context_parallel(batch, noise, self.env)

        latents: list[torch.Tensor] = [None] * len(requests)  # type: ignore[list-item]
        self.model.eval()
        for pack in self._packs(shapes, max_tokens, pad):
            pack_latents = sample_latents(
                self._model_fn, self.edm, sampler_obj, [texts[i] for i in pack], [shapes[i] for i in pack],
                guidance=guidance, seed=seed + pack[0], patch_spatial=p, patch_temporal=pt, pad_multiple=pad,
                device=self.device, model_dtype=self.model_dtype, shard=shard,
                gather=parallel.gather_from_context_parallel,
            )
            for i, latent in zip(pack, pack_latents):
                latents[i] = latent

        sampler_record = {"name": sampler_name, **attrs.asdict(sampler_options)}
        common = {
            "source": {k: str(v) if isinstance(v, Path) else v for k, v in self.source.items()},
            "weights": self.weights,
            "model": self.recipe.model.name,
            "tokenizer": self.recipe.tokenizer.name,
            "text_encoder": self.recipe.text_encoder.name,
            "sampler": sampler_record,
            "num_steps": getattr(sampler_options, "num_steps", None),
            "guidance": guidance,
            "base_seed": seed,
            "device": self.device.type,
            "dtype": str(self.model_dtype).removeprefix("torch."),
            "parallel": {"tensor": self.env.tp_size, "context": self.env.cp_size},
            "overrides": self.overrides,
            "dfmkit_version": __version__,
        }
        rank0 = self.env.rank == 0
        out_dir = Path(out) if out is not None else None
        outputs = []
        for index, (request, shape, latent) in enumerate(zip(requests, shapes, latents)):
            sample_seed = seed + index
            settings = _jsonable({
                **common, "index": index, "prompt": request.prompt, "seed": sample_seed,
                "height": request.height, "width": request.width, "frames": request.frames, "fps": fps,
                "latent_shape": list(shape),
                "command": self._command(request, sampler_name, sampler_options, guidance, sample_seed, fps),
            })
            pixels = path = None
            if rank0:
                pixels = self.tokenizer.decode(latent[None])[0].float().cpu()
                if out_dir is not None:
                    path = save_media(to_uint8_frames(pixels), out_dir / f"{index:03d}", fps=fps)
                    settings["file"] = path.name
                    (out_dir / f"{index:03d}.json").write_text(json.dumps(settings, indent=2) + "\n")
            outputs.append(Output(index=index, prompt=request.prompt, seed=sample_seed, height=request.height,
                                  width=request.width, frames=request.frames, latent=latent, pixels=pixels, path=path,
                                  settings=settings))
        parallel.barrier()
        return outputs

    def _command(self, request: Request, sampler: str, options: Any, guidance: float, seed: int, fps: float) -> str:
        """The ``dfmkit generate`` line that regenerates this output alone (exact when the sampler adds no
        churn noise; the pixels may differ in the last bits, as the pack differs)."""
        parts = ["dfmkit", "generate", "--checkpoint", str(self.source["path"]), "--prompt", request.prompt,
                 "--height", str(request.height), "--width", str(request.width), "--frames", str(request.frames),
                 "--sampler", sampler, "--guidance", f"{guidance:g}", "--seed", str(seed), "--weights", self.weights,
                 "--fps", f"{fps:g}"]
        if hasattr(options, "num_steps"):
            parts += ["--steps", str(options.num_steps)]
        parts += ["--out", "OUT"]
        for override in self.overrides:
            parts += ["--set", override]
        return shlex.join(parts)


def load(
    path: str | os.PathLike[str],
    *,
    weights: str = "ema",
    overrides: Sequence[str] = (),
    recipe: Recipe | None = None,
    plugins: Any = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    tensor: int = 1,
    context: int | None = None,
    keep_text_encoder: bool = True,
) -> Generator:
    """A :class:`Generator` for a checkpoint or an export at ``path``.

    ``recipe`` (default: the one stored with the weights) and ``overrides`` (dotted ``key=value``, e.g.
    ``text_encoder.path=/models/t5``) give the components; ``weights`` is "ema" or "model";
    ``precision`` "auto" follows the recipe's ``train.precision`` (auto: bf16 on GPU, fp32 on CPU).
    ``tensor``/``context`` set the parallel layout (default: context parallelism over all processes).
    """
    from dfmkit import export as export_module
    from dfmkit import parallel
    from dfmkit.plugins import default_plugins

    if weights not in WEIGHTS:
        raise GenerateError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    plugins = plugins or default_plugins()
    kind, where = resolve_source(path)
    if kind == "export":
        config = export_module.read_config(where)
        data, iteration = export_module.recipe_data(config), config.get("iteration")
        model_name = config["backbone"]["name"]
    else:
        data, marker = checkpoint_recipe_data(where)
        iteration, model_name = marker.get("iteration"), marker.get("model")
    if recipe is None:
        recipe = load_recipe(data, overrides, registries=plugins.registries)
    else:
        recipe = load_recipe(recipe, overrides, registries=plugins.registries)
        if recipe.model.name != model_name:
            raise GenerateError(f"{where} holds a '{model_name}' model, the recipe builds '{recipe.model.name}'")
    device = resolve_device(device, "--device", "use --device cpu")
    layout = generation_parallel(tensor, context)
    recipe = attrs.evolve(recipe, parallel=layout)
    env = parallel.initialize(layout, device, seed=recipe.train.seed)
    model_dtype = resolve_precision(recipe.train.precision if precision == "auto" else precision, device,
                                    "--precision")

    job = Job(recipe, plugins)
    model = job.components["model"].build(recipe=recipe).to(device)
    if kind == "export":
        full = export_module.load_weights(where, config, weights)
        state = slice_for_layout(model, full, str(where))
    else:
        states = read_checkpoint_states(model, where, WEIGHTS if weights == "ema" else ("model",))
        state = dict(states["model"])
        if weights == "ema":
            state.update(states["ema"])  # the EMA covers the trained parameters; buffers come from the model
    assign_weights(model, {k: v.to(device) for k, v in state.items()})
    model.to(model_dtype).eval().requires_grad_(False)
    source = {"kind": kind, "path": str(where), "iteration": iteration}
    return Generator(job, model, source=source, weights=weights, device=device, model_dtype=model_dtype, env=env,
                     overrides=overrides, keep_text_encoder=keep_text_encoder)


def generate(
    path: str | os.PathLike[str], prompts: str | Sequence[str | Mapping[str, Any]], **options: Any
) -> list[Output]:
    """:func:`load` the checkpoint or export at ``path`` and :meth:`Generator.generate` ``prompts``.

    ``options`` are split between the two (load: weights, overrides, recipe, plugins, device, precision,
    tensor, context; the rest go to :meth:`Generator.generate`).
    """
    load_keys = {"weights", "overrides", "recipe", "plugins", "device", "precision", "tensor", "context",
                 "keep_text_encoder"}
    generator = load(path, **{k: v for k, v in options.items() if k in load_keys})
    return generator.generate(prompts, **{k: v for k, v in options.items() if k not in load_keys})


def generate_for_job(job: Job, prompts: str | Sequence[str | Mapping[str, Any]], *,
                     checkpoint: str | os.PathLike[str] | None = None, **options: Any) -> list[Output]:
    """What ``dfmkit.build(recipe).generate(prompts, ...)`` does: the job's recipe and plugins, the weights of
    ``checkpoint`` (default: the recipe's ``checkpoint.load``, else its ``checkpoint.dir``)."""
    source = checkpoint or job.recipe.checkpoint.load or job.recipe.checkpoint.dir
    return generate(source, prompts, recipe=job.recipe, plugins=job.plugins, **options)


# ============================================================================================
# Command line
# ============================================================================================


def cmd_generate(args: Any) -> int:
    prompts: list[str | dict[str, Any]] = list(args.prompt)
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts:
        raise GenerateError("no prompts: give --prompt TEXT (repeatable) or --prompt-file FILE")
    generator = load(args.checkpoint, weights=args.weights, overrides=args.overrides, device=args.device,
                     precision=args.precision, tensor=args.tensor, context=args.context, keep_text_encoder=False)
    outputs = generator.generate(prompts, height=args.height, width=args.width, frames=args.frames, steps=args.steps,
                                 guidance=args.guidance, sampler=args.sampler, seed=args.seed, out=args.out,
                                 fps=args.fps, max_tokens=args.max_tokens)
    if generator.env.rank == 0:
        for output in outputs:
            size = f"{output.frames}x{output.height}x{output.width}"
            print(f"{output.path}  seed {output.seed}  {size}  {output.prompt!r}")
    return 0


__all__ = ["GenerateError", "Generator", "Output", "Request", "generate", "generate_for_job", "latent_shape_for",
           "load", "make_requests", "read_prompt_file"]
