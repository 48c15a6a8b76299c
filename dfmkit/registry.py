"""Registries: for each kind of component, a map from name to factory, options class and origin."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from dfmkit.errors import DuplicateComponentError, UnknownComponentError, did_you_mean

KINDS = ("backbone", "objective", "sampler", "tokenizer", "text_encoder", "task_encoder", "attention")
BUILTIN = "built-in"


@attrs.define(kw_only=True)
class NoOptions:
    """A component that takes no options."""


@attrs.frozen
class Component:
    """One registered component: ``factory(options, **context)`` builds it."""

    kind: str
    name: str
    factory: Callable[..., Any] | str  # a callable, or "module:attribute" imported on first use
    options: type
    origin: str
    summary: str = ""

    def load_factory(self) -> Callable[..., Any]:
        if callable(self.factory):
            return self.factory
        module, _, attribute = self.factory.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def build(self, options: Any = None, **context: Any) -> Any:
        if options is None:
            options = self.options()
        if not isinstance(options, self.options):
            raise TypeError(f"{self.kind} '{self.name}' takes {self.options.__name__}, got {type(options).__name__}")
        return self.load_factory()(options, **context)


class Registry:
    """The components of one kind, by name."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        self.kind = kind
        self._entries: dict[str, Component] = {}
        self._origin = BUILTIN
        self.unavailable_note = ""  # set by the plugin manager when a plugin failed to load

    def register(
        self,
        name: str,
        factory: Callable[..., Any] | str,
        *,
        options: type = NoOptions,
        summary: str | None = None,
    ) -> Component:
        """Add ``name``; ``options`` is the attrs class that validates its recipe section."""
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"{self.kind} name must be a non-empty string without surrounding spaces, got {name!r}")
        if not attrs.has(options):
            raise TypeError(f"options of {self.kind} '{name}' must be an attrs class, got {options!r}")
        if "name" in attrs.fields_dict(options):
            raise TypeError(f"options of {self.kind} '{name}' may not have a field called 'name' (the recipe uses it)")
        if name in self._entries:
            raise DuplicateComponentError(
                f"{self.kind} '{name}' is registered twice: by {self._entries[name].origin} and by {self._origin}; "
                "uninstall one of the two packages or rename the component"
            )
        if summary is None:
            doc = (getattr(factory, "__doc__", None) if callable(factory) else None) or options.__doc__ or ""
            summary = doc.strip().splitlines()[0] if doc.strip() else ""
        entry = Component(self.kind, name, factory, options, self._origin, summary)
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Component:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        names = sorted(self._entries)
        message = f"unknown {self.kind} '{name}'"
        guess = did_you_mean(name, names)
        message += f"; did you mean '{guess}'?" if guess else "."
        message += f" Available: {', '.join(names) if names else '(none)'}."
        if self.unavailable_note:
            message += f" {self.unavailable_note}"
        return message

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Component]:
        return iter(sorted(self._entries.values(), key=lambda c: c.name))

    def __len__(self) -> int:
        return len(self._entries)


class Registries:
    """One :class:`Registry` per kind, as attributes: ``registries.sampler`` and so on."""

    backbone: Registry
    objective: Registry
    sampler: Registry
    tokenizer: Registry
    text_encoder: Registry
    task_encoder: Registry
    attention: Registry

    def __init__(self) -> None:
        for kind in KINDS:
            setattr(self, kind, Registry(kind))

    def __getitem__(self, kind: str) -> Registry:
        if kind not in KINDS:
            raise KeyError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        return getattr(self, kind)

    def __iter__(self) -> Iterator[Registry]:
        return (getattr(self, kind) for kind in KINDS)

    def staged(self, origin: str) -> Registries:
        """An empty set of registries whose entries carry ``origin``; merge it with :meth:`merge`."""
        staged = Registries()
        for registry in staged:
            registry._origin = origin
        return staged

    def merge(self, staged: Registries) -> None:
        """Add every entry of ``staged``, or none if one of them is a duplicate."""
        for registry in staged:
            mine = self[registry.kind]
            for name, entry in registry._entries.items():
                if name in mine._entries:
                    raise DuplicateComponentError(
                        f"{registry.kind} '{name}' is registered twice: by {mine._entries[name].origin} and by "
                        f"{entry.origin}; uninstall one of the two packages or rename the component"
                    )
        for registry in staged:
            self[registry.kind]._entries.update(registry._entries)
