"""Loading recipes with cattrs: strict types, every mistake of every section in one :class:`RecipeError`, component
switches, and TOML output.

Numbers are checked as they are read, in every section and every component's options: a float must be
finite (NaN never passes; a field whose meaning includes infinity is typed :data:`FloatOrInf`), and an
integer must fit in 64 bits, as TOML, torch and numpy hold them. Every mistake is reported with its dotted path
and, where a close match exists, a suggestion.
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
from typing import Annotated, Any

import attrs
import cattrs
import tomli_w
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)

from dfmkit import recipe_checks
from dfmkit.errors import DfmkitError, RecipeError, UnknownComponentError, did_you_mean
from dfmkit.recipe.files import read_recipe_file, resolve_recipe_path
from dfmkit.recipe.overrides import Raw, apply_overrides
from dfmkit.recipe.sections import (
    COMPONENT_SECTIONS,
    INT64_MAX,
    INT64_MIN,
    ComponentSection,
    DiffusionSection,
    InfAllowed,
    Recipe,
    SamplerSection,
)
from dfmkit.registry import Registries

log = logging.getLogger("dfmkit")

#: Keys of the sampling grid that recipes written before objectives existed put in ``[sampler]``.
SAMPLING_GRID_KEYS = ("sigma_min", "sigma_max", "rho")

# --------------------------------------------------------------------------------------------
# Structuring: strict types, overrides coerced to the target type
# --------------------------------------------------------------------------------------------


class _ValueError(ValueError):
    """A value of the wrong type or form; the message is shown as it is."""


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, Raw) else repr(str(value))


def _structure_int(value: Any, _: type) -> int:
    if isinstance(value, Raw):
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
    if isinstance(value, Raw):
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
    return repr(str(value)) if isinstance(value, Raw) else str(value)


def _allows_inf(t: Any) -> bool:
    return typing.get_origin(t) is Annotated and any(isinstance(m, InfAllowed) for m in typing.get_args(t)[1:])


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _structure_bool(value: Any, _: type) -> bool:
    if isinstance(value, Raw):
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise _ValueError(f"expected true or false, got {_describe(value)}")
    if not isinstance(value, bool):
        raise _ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _structure_str(value: Any, _: type) -> str:
    if isinstance(value, Raw):
        text = str(value)
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            return tomllib.loads(f"v = {text}")["v"]
        return text
    if not isinstance(value, str):
        raise _ValueError(f"expected a string, got {_describe(value)}")
    return value


def _parse_raw_array(value: Raw) -> list[Any]:
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
        if isinstance(value, Raw):
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
        if value is None or (isinstance(value, Raw) and value.lower() in ("none", "null")):
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
