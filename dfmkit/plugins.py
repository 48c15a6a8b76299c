"""The one place that loads plugins: dfmkit's built-in components, then the entry-point group ``dfmkit``."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
from collections.abc import Iterable
from typing import Any

import attrs
import pluggy

from dfmkit import hookspecs
from dfmkit.errors import PluginError
from dfmkit.registry import BUILTIN, Registries

log = logging.getLogger("dfmkit")

ENTRY_POINT_GROUP = "dfmkit"

# Built-in components register through the same hook as third-party plugins.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "dfmkit.components.tokenizers",
    "dfmkit.components.backbones",
    "dfmkit.components.objectives",
    "dfmkit.components.attention",
    "dfmkit.components.samplers",
    "dfmkit.components.text_encoders",
    "dfmkit.components.task_encoders",
)


@attrs.frozen
class PluginFailure:
    """A plugin that was skipped; the built-ins and every other plugin stay usable."""

    plugin: str
    origin: str
    error: str

    def message(self) -> str:
        return f"plugin '{self.plugin}' from {self.origin} was skipped: {self.error}"


class PluginManager:
    """Loads plugins and fills one :class:`~dfmkit.registry.Registries` from their hooks."""

    def __init__(
        self,
        *,
        builtins: Iterable[str] = BUILTIN_PLUGINS,
        entry_points: bool = True,
        extra: Iterable[tuple[Any, str]] = (),
    ):
        """``extra`` holds (plugin object, origin) pairs registered after the entry points."""
        self.pluggy = pluggy.PluginManager(hookspecs.PROJECT)
        self.pluggy.add_hookspecs(hookspecs)
        self.registries = Registries()
        self.failures: list[PluginFailure] = []
        for module_name in builtins:
            # A built-in that fails to import is a bug in dfmkit, not a user error: let it raise.
            self._add(importlib.import_module(module_name), module_name, BUILTIN, strict=True)
        if entry_points:
            self._load_entry_points()
        for plugin, origin in extra:
            self._add(plugin, getattr(plugin, "__name__", repr(plugin)), origin)
        if self.failures:
            note = "Plugins skipped: " + "; ".join(f"{f.plugin} ({f.origin})" for f in self.failures)
            note += ". Run `dfmkit plugins` for the reasons."
            for registry in self.registries:
                registry.unavailable_note = note
            for failure in self.failures:
                log.warning(failure.message())

    def _load_entry_points(self) -> None:
        seen: set[tuple[str, str]] = set()
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = entry_point.dist
            origin = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
            key = (origin, entry_point.name)
            if key in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(key)
            try:
                plugin = entry_point.load()
            except Exception as exc:  # any import failure of a third-party plugin is reported, not raised
                self.failures.append(PluginFailure(entry_point.name, origin, f"import failed: {type(exc).__name__}: {exc}"))
                continue
            self._add(plugin, entry_point.name, origin)

    def _add(self, plugin: Any, name: str, origin: str, strict: bool = False) -> None:
        plugin_name = f"{origin}:{name}"
        try:
            self.pluggy.register(plugin, name=plugin_name)
            staged = self.registries.staged(origin)
            for impl in self.pluggy.hook.dfmkit_register.get_hookimpls():
                if impl.plugin_name == plugin_name:
                    impl.function(registries=staged)
            self.registries.merge(staged)
        except Exception as exc:
            if strict:
                raise
            if self.pluggy.is_registered(plugin):
                self.pluggy.unregister(plugin)
            self.failures.append(PluginFailure(name, origin, f"{type(exc).__name__}: {exc}"))

    def describe(self) -> list[dict[str, str]]:
        """Every component as a dict of kind, name, origin and summary, for ``dfmkit plugins``."""
        return [
            {"kind": c.kind, "name": c.name, "origin": c.origin, "summary": c.summary}
            for registry in self.registries
            for c in registry
        ]


@functools.cache
def default_plugins() -> PluginManager:
    """The process-wide plugin manager: built-ins plus installed entry points."""
    return PluginManager()


def require_no_failures(manager: PluginManager) -> None:
    """Raise one :class:`PluginError` listing every skipped plugin (for strict callers)."""
    if manager.failures:
        raise PluginError("\n".join(f.message() for f in manager.failures))
