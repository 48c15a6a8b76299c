"""A Job: a validated recipe with each of its components resolved to a registry entry."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from dfmkit.plugins import PluginManager, default_plugins
from dfmkit.recipe import COMPONENT_SECTIONS, Recipe, load_recipe
from dfmkit.registry import Component, Registries


@attrs.frozen
class ResolvedComponent:
    """The component a recipe section names, with that section's validated options.

    ``build`` hands the factory the job's ``registries`` in its context, so a component that builds other
    components (a backbone its attention backend) takes them from the job's plugins, not process-wide ones."""

    section: str
    component: Component
    options: Any
    registries: Registries | None = None

    def build(self, **context: Any) -> Any:
        if self.registries is not None:
            context.setdefault("registries", self.registries)
        return self.component.build(self.options, **context)


class Job:
    """What :func:`dfmkit.build` returns: the recipe and its resolved components.

    Train it with :func:`dfmkit.train.loop.train`; sample its trained weights with
    :func:`dfmkit.generation.generate_for_job`."""

    def __init__(self, recipe: Recipe, plugins: PluginManager):
        self.recipe = recipe
        self.plugins = plugins
        self.components: dict[str, ResolvedComponent] = {}
        for section, section_type in COMPONENT_SECTIONS.items():
            chosen = getattr(recipe, section)
            entry = plugins.registries[section_type.kind].get(chosen.name)
            self.components[section] = ResolvedComponent(section, entry, chosen.options, plugins.registries)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={c.component.name}" for k, c in self.components.items())
        return f"Job({parts})"


def build(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe,
    overrides: Iterable[str] = (),
    *,
    plugins: PluginManager | None = None,
) -> Job:
    """A :class:`Job` from a recipe path (or packaged name), a dict, or a :class:`Recipe`."""
    plugins = plugins or default_plugins()
    return Job(load_recipe(recipe, overrides, registries=plugins.registries), plugins)
