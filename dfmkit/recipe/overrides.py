"""Dotted overrides from the command line (``train.train_iters=20000``): each value stays text (:class:`Raw`) until
it lands in its field, whose type it then takes (:mod:`dfmkit.recipe.loading`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dfmkit.errors import RecipeError


class Raw(str):
    """A value typed on the command line; it takes the type of the field it lands in."""


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
            node[parts[-1]] = Raw(value.strip())
    if problems:
        raise RecipeError(problems, "command line")
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(x) for k, x in value.items()}
    if isinstance(value, list):
        return [_deep_copy(x) for x in value]
    return value

