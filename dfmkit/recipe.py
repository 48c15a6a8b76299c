"""Recipes: the attrs schema of a TOML recipe, loading with cattrs, dotted overrides, and TOML output.

A recipe has fixed sections (``[data]``, ``[train]``, ``[optim]``, ``[parallel]``, ``[checkpoint]``,
``[logging]``, ``[validation]``) and component sections (``[model]``, ``[diffusion]`` (the objective),
``[sampler]``, ``[tokenizer]``, ``[text_encoder]``, ``[task_encoder]``) that name a registered
component with ``name = "..."``; the rest of a component section is validated by that
component's own options class. Every mistake is reported with its dotted path and, where a
close match exists, a suggestion.

Numbers are checked as they are read, in every section and every component's options: a float must be
finite (NaN never passes; a field whose meaning includes infinity is typed :data:`FloatOrInf`), and an
integer must fit in 64 bits, as TOML, torch and numpy hold them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

import attrs
import cattrs
import tomli_w
from attrs import validators as v
from cattrs.errors import AttributeValidationNote, ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from dfmkit import recipe_checks
from dfmkit.errors import DfmkitError, RecipeError, UnknownComponentError, did_you_mean
from dfmkit.hookspecs import DEFINES_MODEL
from dfmkit.registry import Registries

log = logging.getLogger("dfmkit")

PACKAGED_RECIPES = Path(__file__).parent / "recipes"


class _InfAllowed:
    """Marks a float field whose documented meaning includes +-inf; NaN is refused there too."""


#: The type of a float option that may be infinite (``s_max = inf``: no upper bound); plain ``float``
#: fields refuse inf and NaN.
FloatOrInf = Annotated[float, _InfAllowed()]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

#: Keys of the sampling grid that recipes written before objectives existed put in ``[sampler]``.
SAMPLING_GRID_KEYS = ("sigma_min", "sigma_max", "rho")


# --------------------------------------------------------------------------------------------
# Component sections
# --------------------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class ComponentSection:
    """A section that picks a component by ``name``; ``options`` is that component's attrs object."""

    kind: ClassVar[str] = ""
    default: ClassVar[str] = ""
    name: str
    options: Any


class BackboneSection(ComponentSection):
    kind = "backbone"
    default = "dit"


class DiffusionSection(ComponentSection):
    kind = "objective"
    default = "edm"


class SamplerSection(ComponentSection):
    kind = "sampler"
    default = "heun"


class TokenizerSection(ComponentSection):
    kind = "tokenizer"
    default = "identity"


class TextEncoderSection(ComponentSection):
    kind = "text_encoder"
    default = "t5"


class TaskEncoderSection(ComponentSection):
    kind = "task_encoder"
    default = "packed"


# --------------------------------------------------------------------------------------------
# Fixed sections
# --------------------------------------------------------------------------------------------

_positive = v.gt(0)
_non_negative = v.ge(0)
_fraction = [v.ge(0.0), v.le(1.0)]


def _seed(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    # torch.Generator.manual_seed takes up to 2**64 - 1; seeds here are offset (seed + index, megatron's
    # seed + 2718 + rank), so the upper half stays free.
    if not 0 <= value <= INT64_MAX:
        raise ValueError(f"'{attribute.name}' must be an integer from 0 to 2**63 - 1, got {value}")


def _betas(instance: Any, attribute: attrs.Attribute, value: tuple[float, float]) -> None:
    if not all(0.0 <= beta < 1.0 for beta in value):
        raise ValueError(f"'{attribute.name}' each beta must be in [0, 1), got {tuple(value)}")


def _sigmas(instance: Any, attribute: attrs.Attribute, value: list[float]) -> None:
    if not all(sigma > 0 for sigma in value):
        raise ValueError(f"'{attribute.name}' must be noise levels > 0, got {value}")


@attrs.define(kw_only=True)
class DataConfig:
    """Where samples come from and how they are packed into sequences."""

    path: str = ""  # a folder written by `dfmkit prepare` (Energon-indexed WebDataset)
    # If `path` does not exist yet, `dfmkit run` first prepares it from this source (as `dfmkit prepare --source`).
    prepare_source: str = ""
    mock: bool = False  # random latents and text of the shapes below, for benchmarks
    seq_length: int = attrs.field(default=4096, validator=_positive)  # latent tokens per packed sequence (at most)
    packing_buffer_size: int = attrs.field(default=64, validator=_positive)  # samples considered per packing round
    shuffle_buffer_size: int = attrs.field(default=100, validator=_non_negative)
    max_samples_per_sequence: int = attrs.field(default=100, validator=_positive)  # Energon: samples read in a row from one shard
    num_workers: int = attrs.field(default=2, validator=_non_negative)  # loader worker processes per data-parallel rank
    # `dfmkit prepare`: resizing (short side to image_size, 0 keeps it; sides rounded to size_multiple),
    # frames (max_frames, 0 = all), the fps recorded when a source has none, and the train/val/test split.
    image_size: int = attrs.field(default=512, validator=_non_negative)
    size_multiple: int = attrs.field(default=16, validator=_positive)
    resize_mode: str = attrs.field(default="bilinear", validator=v.in_(["bilinear", "bicubic", "nearest"]))
    max_frames: int = attrs.field(default=0, validator=_non_negative)
    fps: float = attrs.field(default=30.0, validator=_positive)
    split: list[float] = attrs.field(factory=lambda: [1.0, 0.0, 0.0])
    # data.mock = true: random samples of these sizes ([C, T, H, W] latent; text tokens x width) packed
    # mock_samples_per_pack to a sequence (0: as many as data.seq_length holds). C = 0 and text width 0
    # take the model's in_channels and text_dim.
    mock_latent_shape: list[int] = attrs.field(factory=lambda: [0, 1, 64, 64])
    mock_text_tokens: int = attrs.field(default=16, validator=_positive)
    mock_text_dim: int = attrs.field(default=0, validator=_non_negative)
    mock_samples_per_pack: int = attrs.field(default=0, validator=_non_negative)

    @split.validator
    def _check_split(self, attribute: attrs.Attribute, value: list[float]) -> None:
        if len(value) != 3 or any(x < 0 for x in value) or sum(value) <= 0:
            raise ValueError(f"'split' must be three non-negative ratios train, val, test such as [0.9, 0.05, 0.05] (got {value})")

    @mock_latent_shape.validator
    def _check_mock_shape(self, attribute: attrs.Attribute, value: list[int]) -> None:
        if len(value) != 4 or value[0] < 0 or any(x < 1 for x in value[1:]):
            raise ValueError(f"'mock_latent_shape' must be four sizes [C, T, H, W], C = 0 for the model's (got {value})")


@attrs.define(kw_only=True)
class TrainConfig:
    """The training loop."""

    train_iters: int = attrs.field(default=20000, validator=_positive)  # more than optim.warmup_iters
    global_batch_size: int = attrs.field(default=8, validator=_positive)  # packed sequences per step
    seed: int = attrs.field(default=1234, validator=_seed)
    device: str = attrs.field(default="auto", validator=v.in_(["auto", "cpu", "cuda"]))
    precision: str = attrs.field(default="auto", validator=v.in_(["auto", "bf16", "fp32"]))
    log_interval: int = attrs.field(default=10, validator=_positive)
    ema_decay: float = attrs.field(default=0.9999, validator=_fraction)
    ema_halflife: float = attrs.field(default=0.0, validator=_non_negative)  # in steps; > 0 overrides ema_decay
    # steps in a row skipped for a non-finite loss or gradient norm before training stops (and saves)
    max_nonfinite_steps: int = attrs.field(default=5, validator=_positive)


@attrs.define(kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (defaults as in the reference)."""

    lr: float = attrs.field(default=9e-5, validator=_positive)
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), validator=_betas)
    eps: float = attrs.field(default=1e-5, validator=_positive)
    weight_decay: float = attrs.field(default=0.033, validator=_non_negative)
    clip_grad: float = attrs.field(default=1.0, validator=_non_negative)  # 0 disables clipping
    warmup_iters: int = attrs.field(default=2000, validator=_non_negative)
    decay_style: str = attrs.field(default="cosine", validator=v.in_(["cosine", "linear", "constant"]))
    min_lr_ratio: float = attrs.field(default=0.1, validator=_fraction)


@attrs.define(kw_only=True)
class ParallelConfig:
    """Model parallelism; data parallelism takes the remaining processes (world / (tensor * context)).

    tensor: ranks that split every layer's heads and MLP (megatron column/row-parallel linears).
    sequence: also split the tokens between tensor-parallel regions (needs tensor > 1).
    context: ranks that split every packed sample's tokens (attention gathers keys/values).
    Each sample is padded to a multiple of :attr:`pad_multiple` tokens.
    """

    tensor: int = attrs.field(default=1, validator=_positive)
    sequence: bool = False  # sequence parallelism inside tensor-parallel regions (needs tensor > 1)
    context: int = attrs.field(default=1, validator=_positive)
    distributed_optimizer: str = attrs.field(default="auto", validator=v.in_(["auto", "on", "off"]))

    def __attrs_post_init__(self) -> None:
        if self.sequence and self.tensor == 1:
            raise ValueError("sequence = true needs tensor > 1 (sequence parallelism splits tensor-parallel regions)")

    @property
    def pad_multiple(self) -> int:
        """What every sample's token count is padded to a multiple of: ``2 * context`` when context
        parallelism is on (the load-balanced split), times ``tensor`` when sequence parallelism is on (each
        context shard is split again across the tensor-parallel ranks); 1 otherwise."""
        multiple = 2 * self.context if self.context > 1 else 1
        return multiple * self.tensor if self.sequence and self.tensor > 1 else multiple


@attrs.define(kw_only=True)
class CheckpointConfig:
    """Where and how often to save; resume picks up the newest complete checkpoint."""

    dir: str = "checkpoints"
    save_interval: int = attrs.field(default=1000, validator=_non_negative)  # 0: only at the end
    keep_last: int = attrs.field(default=3, validator=_positive)
    resume: bool = True
    load: str = ""  # start from this checkpoint instead of the newest one in `dir`
    # A resume on data whose index differs from the one the checkpoint read: "refuse" (an error naming the change),
    # or "restart" (everything else resumes; the data is read from its start).
    on_data_change: str = attrs.field(default="refuse", validator=v.in_(["refuse", "restart"]))


@attrs.define(kw_only=True)
class LoggingConfig:
    """TensorBoard always, Weights & Biases when a project is named."""

    dir: str = ""  # default: <checkpoint.dir>/tensorboard
    wandb_project: str = ""
    wandb_entity: str = ""
    progress: bool = True  # a progress bar on a terminal; elsewhere, and when off: a line per train.log_interval


@attrs.define(kw_only=True)
class ValidationConfig:
    """Periodic validation: loss at fixed noise levels and generation of the prompts."""

    interval: int = attrs.field(default=1000, validator=_non_negative)  # 0: never
    prompts: list[str] = attrs.Factory(list)
    height: int = attrs.field(default=256, validator=_positive)
    width: int = attrs.field(default=256, validator=_positive)
    frames: int = attrs.field(default=1, validator=_positive)
    guidance: float = 7.0  # classifier-free guidance w (1: none); steps and sampler come from [sampler]
    seed: int = attrs.field(default=0, validator=_seed)
    loss_sigmas: list[float] = attrs.field(factory=list, validator=_sigmas)  # []: the objective's LOSS_SIGMAS
    loss_batches: int = attrs.field(default=2, validator=_non_negative)
    # Generation on a GPU: each pack's sampler evaluations replay one CUDA graph (dfmkit.generation.graphs), captured
    # at each validation and freed after it, as `dfmkit generate` does. Far less host time per evaluation (few
    # prompts are bound by kernel launches); costs one capture per validation and, while it runs, about one
    # forward's activations of GPU memory, no more than sampling without graphs peaks at. Layouts without tensor or
    # context parallelism only (others sample eagerly); not with model.cuda_graphs, whose graphs are used instead.
    cuda_graphs: bool = True


@attrs.define(kw_only=True)
class Recipe:
    """A whole recipe. Build one with :func:`load_recipe`, which validates every section."""

    model: BackboneSection
    diffusion: DiffusionSection
    sampler: SamplerSection
    tokenizer: TokenizerSection
    text_encoder: TextEncoderSection
    task_encoder: TaskEncoderSection
    data: DataConfig = attrs.Factory(DataConfig)
    train: TrainConfig = attrs.Factory(TrainConfig)
    optim: OptimConfig = attrs.Factory(OptimConfig)
    parallel: ParallelConfig = attrs.Factory(ParallelConfig)
    checkpoint: CheckpointConfig = attrs.Factory(CheckpointConfig)
    logging: LoggingConfig = attrs.Factory(LoggingConfig)
    validation: ValidationConfig = attrs.Factory(ValidationConfig)


attrs.resolve_types(Recipe)  # `from __future__ import annotations` leaves field.type as a string until resolved

COMPONENT_SECTIONS: dict[str, type[ComponentSection]] = {
    field.name: field.type
    for field in attrs.fields(Recipe)
    if isinstance(field.type, type) and issubclass(field.type, ComponentSection)
}


# --------------------------------------------------------------------------------------------
# Structuring: strict types, overrides coerced to the target type
# --------------------------------------------------------------------------------------------


class _Raw(str):
    """A value typed on the command line; it takes the type of the field it lands in."""


class _ValueError(ValueError):
    """A value of the wrong type or form; the message is shown as it is."""


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, _Raw) else repr(str(value))


def _structure_int(value: Any, _: type) -> int:
    if isinstance(value, _Raw):
        try:
            number = int(value.replace("_", ""))
        except ValueError:
            raise _ValueError(f"expected an integer, got {_describe(value)}") from None
    elif isinstance(value, bool) or not isinstance(value, int):
        raise _ValueError(f"expected an integer, got {_describe(value)}")
    else:
        number = value
    if not INT64_MIN <= number <= INT64_MAX:
        raise _ValueError(f"expected an integer that fits in 64 bits, got {_describe(value)}")
    return number


def _read_float(value: Any) -> float:
    if isinstance(value, _Raw):
        try:
            return float(value)
        except ValueError:
            raise _ValueError(f"expected a number, got {_describe(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _ValueError(f"expected a number, got {_describe(value)}")
    return float(value)


def _structure_float(value: Any, _: type) -> float:
    number = _read_float(value)
    if not math.isfinite(number):
        raise _ValueError(f"expected a finite number, got {_describe_number(value)}")
    return number


def _structure_float_or_inf(value: Any, _: type) -> float:
    number = _read_float(value)
    if math.isnan(number):
        raise _ValueError(f"expected a number or inf, got {_describe_number(value)}")
    return number


def _describe_number(value: Any) -> str:
    return repr(str(value)) if isinstance(value, _Raw) else str(value)


def _allows_inf(t: Any) -> bool:
    return typing.get_origin(t) is Annotated and any(isinstance(m, _InfAllowed) for m in typing.get_args(t)[1:])


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _structure_bool(value: Any, _: type) -> bool:
    if isinstance(value, _Raw):
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise _ValueError(f"expected true or false, got {_describe(value)}")
    if not isinstance(value, bool):
        raise _ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _structure_str(value: Any, _: type) -> str:
    if isinstance(value, _Raw):
        text = str(value)
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            return tomllib.loads(f"v = {text}")["v"]
        return text
    if not isinstance(value, str):
        raise _ValueError(f"expected a string, got {_describe(value)}")
    return value


def _parse_raw_array(value: _Raw) -> list[Any]:
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = None
    if not isinstance(parsed, list):
        raise _ValueError(f"expected a TOML array such as [1, 2] or [\"a\", \"b\"], got {_describe(value)}")
    return parsed


def _is_optional(t: Any) -> bool:
    args = typing.get_args(t)
    return typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in args


class RecipeLoader:
    """Structures and unstructures recipes against one set of registries."""

    def __init__(self, registries: Registries):
        self.registries = registries
        c = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
        c.register_structure_hook_factory(attrs.has, self._attrs_hook)
        c.register_structure_hook(int, _structure_int)
        c.register_structure_hook(float, _structure_float)
        c.register_structure_hook_func(_allows_inf, _structure_float_or_inf)
        c.register_structure_hook(bool, _structure_bool)
        c.register_structure_hook(str, _structure_str)
        c.register_structure_hook_func(
            lambda t: typing.get_origin(t) in (list, tuple), self._structure_sequence
        )
        c.register_structure_hook_func(_is_optional, self._structure_optional)
        c.register_structure_hook_func(
            lambda t: isinstance(t, type) and issubclass(t, ComponentSection), self._structure_component
        )
        c.register_unstructure_hook_func(
            lambda t: isinstance(t, type) and issubclass(t, ComponentSection), self._unstructure_component
        )
        c.register_unstructure_hook(tuple, list)
        self.converter = c

    # -- structure hooks ---------------------------------------------------------------------

    def _attrs_hook(self, cl: type) -> Any:
        """cattrs' hook for an attrs class, reporting every mistake of a section: its unknown keys, and each
        field's wrong type or, once the types are right, each field validator that fails (attrs stops at the
        first)."""
        structure = self.converter.gen_structure_attrs_fromdict(cl)
        names = {field.name for field in attrs.fields(cl)}

        def structure_all(value: Any, t: type) -> Any:
            failures: list[Exception] = []
            if isinstance(value, Mapping) and not names.issuperset(value):
                failures.append(ForbiddenExtraKeysError("", cl, set(value) - names))
                value = {k: v for k, v in value.items() if k in names}
            try:
                instance = structure(value, t)
            except (ValueError, ClassValidationError) as exc:
                failures += self._field_failures(cl, structure, value, t) or getattr(exc, "exceptions", [exc])
            if failures:
                raise ClassValidationError(f"While structuring {cl.__name__}", failures, cl)
            return instance

        return structure_all

    @staticmethod
    def _field_failures(cl: type, structure: Any, value: Any, t: type) -> list[Exception]:
        """Each field validator's complaint, when the values have the right types; else nothing."""
        with attrs.validators.disabled():
            try:
                instance = structure(value, t)
            except Exception:  # noqa: BLE001 - wrong types (or __attrs_post_init__): cattrs' report says it
                return []
        failures: list[Exception] = []
        for field in attrs.fields(cl):
            try:
                if field.validator is not None:
                    field.validator(instance, field, getattr(instance, field.name))
            except ValueError as exc:
                failures.append(exc)
        return failures

    def _structure_sequence(self, value: Any, t: Any) -> Any:
        if isinstance(value, _Raw):
            value = _parse_raw_array(value)
        if not isinstance(value, (list, tuple)):
            raise _ValueError(f"expected an array, got {_describe(value)}")
        args = typing.get_args(t)
        if typing.get_origin(t) is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _ValueError(f"expected an array of {len(args)} values, got {len(value)}")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        items, errors = [], []
        for index, (item, item_type) in enumerate(zip(value, item_types)):
            try:
                items.append(self.converter.structure(item, item_type))
            except Exception as exc:
                exc.__notes__ = [*getattr(exc, "__notes__", []), _IndexNote(index)]
                errors.append(exc)
        if errors:
            raise IterableValidationError("While structuring an array", errors, t)
        return typing.get_origin(t)(items)

    def _structure_optional(self, value: Any, t: Any) -> Any:
        if value is None or (isinstance(value, _Raw) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in typing.get_args(t) if a is not type(None)]
        return self.converter.structure(value, inner[0] if len(inner) == 1 else typing.Union[tuple(inner)])

    def _structure_component(self, value: Any, section: type[ComponentSection]) -> ComponentSection:
        if not isinstance(value, Mapping):
            raise _ValueError(f"expected a table with name = \"...\", got {_describe(value)}")
        data = dict(value)
        name = data.pop("name", section.default)
        try:
            name = _structure_str(name, str)
            component = self.registries[section.kind].get(name)
        except (UnknownComponentError, _ValueError) as exc:
            exc.__notes__ = [AttributeValidationNote("name", "name", str)]
            raise ClassValidationError(f"While structuring {section.__name__}", [exc], section) from None
        options = self.converter.structure(data, component.options)
        return section(name=name, options=options)

    def _unstructure_component(self, section: ComponentSection) -> dict[str, Any]:
        return {"name": section.name, **self.converter.unstructure(section.options)}

    # -- public ------------------------------------------------------------------------------

    def structure(self, data: Mapping[str, Any], source: str | None = None) -> Recipe:
        """The recipe of ``data``, or one :class:`RecipeError` listing every mistake: each section's own,
        then those of the checks across sections and against the registries (:mod:`dfmkit.recipe_checks`)."""
        if not isinstance(data, Mapping):
            raise RecipeError([f"a recipe is a table of sections, got {type(data).__name__}"], source)
        fields = attrs.fields_dict(Recipe)
        data, problems = self._move_sampling_grid(data)
        for key in data:
            if key not in fields:
                guess = did_you_mean(key, list(fields))
                problems.append(f"{key}: unknown key; " + (f"did you mean {guess}?" if guess else
                                                           f"known sections: {', '.join(fields)}"))
        # Section by section, so that the checks can still read the sections that have no mistakes.
        sections, broken = {}, []
        for name, field in fields.items():
            value = data.get(name, {"name": field.type.default} if name in COMPONENT_SECTIONS else {})
            try:
                sections[name] = self.converter.structure(value, field.type)
            except Exception as exc:  # noqa: BLE001 - every mistake of the section, as dotted messages
                broken.append(name)
                problems += _messages(exc, name)
        recipe = Recipe(**sections) if not broken else recipe_checks.PartialRecipe(sections, broken)
        problems += recipe_checks.recipe_problems(recipe, self.registries, COMPONENT_SECTIONS)
        if problems:
            raise RecipeError(problems, source)
        return recipe

    def _move_sampling_grid(self, data: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[str]]:
        """``data`` with the sampling grid's keys moved from ``[sampler]`` to ``[diffusion]``, where recipes written
        before objectives existed (checkpoints' recipes too) hold them in the sampler; a recipe that sets a key in
        both, to different values, is a mistake. Keys the sampler itself takes stay."""
        sampler, diffusion = data.get("sampler"), data.get("diffusion", {})
        if not isinstance(sampler, Mapping) or not isinstance(diffusion, Mapping):
            return data, []
        try:
            sampler_fields = attrs.fields_dict(
                self.registries.sampler.get(_structure_str(sampler.get("name", SamplerSection.default), str)).options)
            objective_fields = attrs.fields_dict(
                self.registries.objective.get(_structure_str(diffusion.get("name", DiffusionSection.default), str)
                                              ).options)
        except (DfmkitError, _ValueError):  # reported when the section is read
            return data, []
        moving = [key for key in SAMPLING_GRID_KEYS
                  if key in sampler and key not in sampler_fields and key in objective_fields]
        if not moving:
            return data, []
        sampler, diffusion, problems = dict(sampler), dict(diffusion), []
        for key in moving:
            value = sampler.pop(key)
            if key in diffusion and diffusion[key] != value:
                problems.append(f"sampler.{key}: the sampling grid is the objective's; this recipe sets sampler.{key} "
                                f"= {value!r} and diffusion.{key} = {diffusion[key]!r}: keep diffusion.{key} only")
            diffusion.setdefault(key, value)
        log.info("recipe: %s moved from [sampler] to [diffusion] (the sampling grid is the objective's)",
                 ", ".join(moving))
        return {**data, "sampler": sampler, "diffusion": diffusion}, problems

    def unstructure(self, recipe: Recipe) -> dict[str, Any]:
        return _drop_none(self.converter.unstructure(recipe))

    def switch_components(self, base: Mapping[str, Any], data: dict[str, Any],
                          overrides: Iterable[str]) -> dict[str, Any]:
        """``data`` (``base`` with ``overrides`` applied) where an override names another component for a
        section: of the base section's options only those the new component also has, and whose values it
        accepts, are kept (a refused value is dropped with a warning: the new default applies). An options class
        whose same-named fields may mean other things in other components of its kind lists those that keep their
        meaning in ``KEPT_ON_SWITCH`` (objectives: ``p_mean`` is of ln(sigma) in EDM, of logit(t) in rectified
        flow); only those are kept. Options given in ``overrides`` are always kept, and checked as usual."""
        given: dict[str, set[str]] = {}
        for override in overrides:
            section, _, key = override.partition("=")[0].strip().partition(".")
            given.setdefault(section, set()).add(key)
        for section, section_type in COMPONENT_SECTIONS.items():
            base_section, new_section = base.get(section), data.get(section)
            if "name" not in given.get(section, ()) or not isinstance(new_section, dict):
                continue
            old_name = base_section.get("name", section_type.default) if isinstance(base_section, Mapping) else None
            try:
                new_name = _structure_str(new_section["name"], str)
                options = self.registries[section_type.kind].get(new_name).options
            except (DfmkitError, _ValueError):  # reported when the section is read
                continue
            if new_name == old_name:
                continue
            fields = set(attrs.fields_dict(options)) & set(getattr(options, "KEPT_ON_SWITCH", attrs.fields_dict(options)))
            kept = {k: v for k, v in new_section.items() if k == "name" or k in given[section] or k in fields}
            carried = [k for k in kept if k != "name" and k not in given[section]]
            if carried and not self._accepts(options, {k: kept[k] for k in carried}):
                for key in carried:
                    if not self._accepts(options, {key: kept[key]}):
                        log.warning("%s.name changed to '%s': %s.%s = %r of '%s' does not suit '%s'; its default "
                                    "applies (set %s.%s to choose)", section, new_name, section, key, kept[key],
                                    old_name, new_name, section, key)
                        del kept[key]
            data[section] = kept
        return data

    def _accepts(self, options: type, values: Mapping[str, Any]) -> bool:
        try:
            self.converter.structure(dict(values), options)
        except Exception:  # noqa: BLE001 - any refusal: the value does not suit these options
            return False
        return True


class _IndexNote(str):
    def __new__(cls, index: int) -> _IndexNote:
        note = str.__new__(cls, f"index {index}")
        note.index = index
        return note


def _messages(exc: BaseException, path: str) -> Iterator[str]:
    """One "dotted.path: problem" line per leaf error of a cattrs exception tree."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        for sub in exc.exceptions:
            notes = getattr(sub, "__notes__", [])
            named = [n for n in notes if isinstance(n, AttributeValidationNote)]
            indexed = [n for n in notes if isinstance(n, _IndexNote) or hasattr(n, "index")]
            if named:
                sub_path = f"{path}.{named[-1].name}" if path else named[-1].name
            elif indexed:
                sub_path = f"{path}[{indexed[-1].index}]"
            else:
                sub_path = path
            yield from _messages(sub, sub_path)
        return
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [f.name for f in attrs.fields(exc.cl)]
        if path in COMPONENT_SECTIONS:
            known = ["name", *known]
        for key in sorted(exc.extra_fields):
            where = f"{path}.{key}" if path else key
            guess = did_you_mean(key, known)
            hint = f"; did you mean {path + '.' if path else ''}{guess}?" if guess else f"; known keys: {', '.join(known)}"
            yield f"{where}: unknown key{hint}"
        return
    if isinstance(exc, KeyError):
        yield f"{path}: required key missing"
        return
    if isinstance(exc, (DfmkitError, _ValueError)):
        yield f"{path}: {exc}"
        return
    if isinstance(exc, ValueError) and exc.args:
        # attrs validators raise "'field' must be ..." from the class's __init__, so the field is in the text.
        text = str(exc.args[0])
        field = re.match(r"'(\w+)' (.*)", text, re.DOTALL)
        if field:
            yield f"{path}.{field.group(1)}: {field.group(2)}" if path else f"{field.group(1)}: {field.group(2)}"
        else:
            yield f"{path}: {text}"
        return
    if isinstance(exc, TypeError):
        yield f"{path}: wrong type ({exc})"
        return
    yield f"{path}: {type(exc).__name__}: {exc}"


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(x) for k, x in value.items() if x is not None}
    if isinstance(value, list):
        return [_drop_none(x) for x in value]
    return value


# --------------------------------------------------------------------------------------------
# Overrides, files and the public functions
# --------------------------------------------------------------------------------------------


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``dotted.key=value`` set; values take their field's type later."""
    result = _deep_copy(data)
    problems = []
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p for p in parts):
            problems.append(f"override {override!r} must look like section.key=value (for example train.train_iters=20000)")
            continue
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"override {override!r}: {'.'.join(parts[: depth + 1])} is a value, not a section")
                break
            node = child
        else:
            node[parts[-1]] = _Raw(value.strip())
    if problems:
        raise RecipeError(problems, "command line")
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(x) for k, x in value.items()}
    if isinstance(value, list):
        return [_deep_copy(x) for x in value]
    return value


def saved_objective(data: Mapping[str, Any]) -> str:
    """The objective a recipe's data names (``diffusion.name``; recipes from before objectives existed: EDM)."""
    diffusion = data.get("diffusion", {})
    return str(diffusion.get("name", DiffusionSection.default)) if isinstance(diffusion, Mapping) else ""


def objective_mismatch(data: Mapping[str, Any], recipe: Recipe) -> str | None:
    """What of the objective the recipe data of a checkpoint was trained with differs from ``recipe``'s in what the
    network computes: another objective, or another value of an option marked ``DEFINES_MODEL``
    (:mod:`dfmkit.hookspecs`); None when they agree. Options the data does not name had their defaults."""
    saved = saved_objective(data)
    if saved != recipe.diffusion.name:
        return f"the objective '{saved}', the recipe names '{recipe.diffusion.name}' (diffusion.name)"
    section = data.get("diffusion", {})
    section = section if isinstance(section, Mapping) else {}
    options = recipe.diffusion.options
    differences = []
    for field in attrs.fields(type(options)):
        if not field.metadata.get(DEFINES_MODEL):
            continue
        current = getattr(options, field.name)
        default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
        trained = section.get(field.name, current if default is attrs.NOTHING else default)
        if trained != current:
            differences.append(f"diffusion.{field.name} {trained!r}, the recipe {current!r}")
    return "; ".join(differences) or None


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped inside the package (usable as ``dfmkit run NAME``)."""
    return sorted(p.stem for p in PACKAGED_RECIPES.glob("*.toml"))


def resolve_recipe_path(recipe: str | os.PathLike[str]) -> Path:
    """A recipe file path, or the name of a packaged recipe such as ``quickstart_digits``."""
    path = Path(recipe)
    if path.is_file():
        return path
    packaged = PACKAGED_RECIPES / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    names = packaged_recipes()
    guess = did_you_mean(path.stem, names)
    hint = f" Did you mean '{guess}'?" if guess else ""
    raise RecipeError(
        [f"recipe file '{recipe}' not found.{hint} Give a path to a .toml file or a packaged recipe: {', '.join(names)}"]
    )


def read_recipe_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except UnicodeDecodeError as exc:
        raise RecipeError([f"not UTF-8 text (byte {exc.start}): a TOML recipe must be saved as UTF-8"],
                          str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"not valid TOML: {exc}"], str(path)) from None
    except OSError as exc:
        raise RecipeError([f"cannot read the recipe: {exc.strerror}"], str(path)) from None


def load_recipe(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe,
    overrides: Iterable[str] = (),
    *,
    registries: Registries | None = None,
) -> Recipe:
    """A validated :class:`Recipe` from a TOML path (or packaged name), a dict, or a Recipe."""
    if registries is None:
        from dfmkit.plugins import default_plugins

        registries = default_plugins().registries
    loader = RecipeLoader(registries)
    overrides = list(overrides)
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        data, source = loader.unstructure(recipe), None
    elif isinstance(recipe, Mapping):
        data, source = dict(recipe), None
    else:
        path = resolve_recipe_path(recipe)
        data, source = read_recipe_file(path), str(path)
    if overrides:
        data = loader.switch_components(data, apply_overrides(data, overrides), overrides)
        source = f"{source} with overrides" if source else "overrides"
    return loader.structure(data, source)


def recipe_to_dict(recipe: Recipe, *, registries: Registries | None = None) -> dict[str, Any]:
    """The recipe as plain TOML-ready data (every default filled in)."""
    if registries is None:
        from dfmkit.plugins import default_plugins

        registries = default_plugins().registries
    return RecipeLoader(registries).unstructure(recipe)


def dump_recipe(recipe: Recipe, *, registries: Registries | None = None) -> str:
    """The resolved recipe as TOML text; loading it gives an equal recipe."""
    return tomli_w.dumps(recipe_to_dict(recipe, registries=registries))
