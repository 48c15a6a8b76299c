"""Every patch, override and private-API use of megatron-core, Megatron-Energon, torch and TensorBoard: the only
place for them.

No other module of dfmkit assigns to, overrides or calls a private attribute of those libraries. Each module here
changes one library area and says in its docstring what it changes, why, and on which versions it was checked
(``CHECKED_ON``). Each has a ``check()`` that returns what the library no longer has of what the module relies on,
each item naming the patch; ``tests/test_compat.py`` runs them all, so an upgrade that breaks a patch fails there by
name rather than somewhere deep in a run.

A module's contract:

- ``CHECKED_ON``: ``{"distribution": "version", ...}``, the versions its patches were written and tested against;
- ``check() -> list[str]``: one line per missing or changed thing, ``"<patch>: <what is missing>"``; empty when
  everything it relies on is there (:func:`missing_attributes` and :func:`missing_parameters` write such lines).

A patch that assigns to a library module or class does it with :func:`replace`, which keeps what was there, so
``check()`` reads the library's own object even after the patch (:func:`shipped`). Patches of single objects (an
optimizer, a dataset) are plain assignments, and ``check()`` looks at their classes.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

#: The compat modules, by library area (``dfmkit.compat.<name>``).
MODULES: tuple[str, ...] = (
    "energon",
    "megatron_checkpoint",
    "megatron_cpu",
    "megatron_ddp",
    "megatron_linear",
    "megatron_optimizer",
    "tensorboard",
    "torch_dcp",
    "torch_optim",
    "torch_tensor",
)


def modules() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{name}") for name in MODULES]


_ABSENT = object()
_originals: dict[tuple[int, str], object] = {}  # (id of a module or class, name) -> what the library had there


def replace(owner: object, name: str, value: object) -> None:
    """``setattr(owner, name, value)`` on a library module or class, remembering what the library had there, which
    ``check()`` then reads (:func:`shipped`): a check run after the patch still sees the library's own object."""
    _originals.setdefault((id(owner), name), getattr(owner, name, _ABSENT))
    setattr(owner, name, value)


def shipped(owner: object, name: str) -> object:
    """``owner.<name>`` as the library has it, before any :func:`replace`; AttributeError if it has none."""
    value = _originals.get((id(owner), name), _ABSENT)
    if value is _ABSENT:
        if (id(owner), name) in _originals:
            raise AttributeError(name)
        return getattr(owner, name)
    return value


def _has(owner: object, name: str) -> bool:
    try:
        shipped(owner, name)
    except AttributeError:
        return False
    return True


def _where(owner: object) -> str:
    where = getattr(owner, "__qualname__", getattr(owner, "__name__", repr(owner)))
    module = getattr(owner, "__module__", None)
    return f"{module}.{where}" if module and not isinstance(owner, ModuleType) else where


def missing_attributes(patch: str, owner: object, *names: str) -> list[str]:
    """``check()``'s usual body: a line for each of ``names`` that ``owner`` (a module or class) lacks."""
    return [f"{patch}: {_where(owner)} has no '{name}'" for name in names if not _has(owner, name)]


def missing_parameters(patch: str, owner: object, name: str, *parameters: str) -> list[str]:
    """A line if ``owner`` lacks the function ``name``, else one for each of ``parameters`` its signature lacks."""
    lines = missing_attributes(patch, owner, name)
    if lines:
        return lines
    where = f"{_where(owner)}.{name}"
    try:
        found = inspect.signature(shipped(owner, name)).parameters
    except (TypeError, ValueError):
        return [f"{patch}: the signature of {where} cannot be read"]
    return [f"{patch}: {where} has no parameter '{p}'" for p in parameters if p not in found]
