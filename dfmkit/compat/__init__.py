"""Every patch, override and private-API use of megatron-core, Megatron-Energon and torch: the only place for them.

No other module of dfmkit assigns to, overrides or calls a private attribute of those libraries. Each module here
changes one library area and says in its docstring what it changes, why, and on which versions it was checked
(``CHECKED_ON``). Each has a ``check()`` that returns what the library no longer has of what the module relies on,
each item naming the patch; ``tests/test_compat.py`` runs them all, so an upgrade that breaks a patch fails there by
name rather than somewhere deep in a run.

A module's contract:

- ``CHECKED_ON``: ``{"distribution": "version", ...}``, the versions its patches were written and tested against;
- ``check() -> list[str]``: one line per missing or changed thing, ``"<patch>: <what is missing>"``; empty when
  everything it relies on is there.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: The compat modules, by library area (``dfmkit.compat.<name>``).
MODULES: tuple[str, ...] = ("megatron_linear",)


def modules() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{name}") for name in MODULES]


def missing_attributes(patch: str, owner: object, *names: str) -> list[str]:
    """``check()``'s usual body: a line for each of ``names`` that ``owner`` (a module or class) lacks."""
    where = getattr(owner, "__qualname__", getattr(owner, "__name__", repr(owner)))
    module = getattr(owner, "__module__", None)
    where = f"{module}.{where}" if module and not isinstance(owner, ModuleType) else where
    return [f"{patch}: {where} has no '{name}'" for name in names if not hasattr(owner, name)]
