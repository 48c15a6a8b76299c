"""The hook specifications of dfmkit: the only public extension surface.

A plugin is a module (or any object) with functions marked ``@dfmkit.hookimpl`` whose names
match the specs below. Third-party packages expose one through the entry-point group ``dfmkit``::

    [project.entry-points.dfmkit]
    my_sampler = "my_package.plugin"

and dfmkit's own components register through exactly the same hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from dfmkit.registry import Registries

PROJECT = "dfmkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dfmkit_register(registries: Registries) -> None:
    """Add components to the registries.

    ``registries`` has one :class:`~dfmkit.registry.Registry` per kind: ``backbone``,
    ``sampler``, ``tokenizer``, ``text_encoder``, ``task_encoder`` and ``attention``.
    Register with ``registries.sampler.register("my-sampler", build, options=MyOptions)``
    where ``MyOptions`` is an attrs class of the options the recipe section may set and
    ``build(options, **context)`` returns the component; ``context`` holds what the caller has (``recipe``, the
    job's ``registries``, ...), so factories take ``**context`` and ignore what they do not use.
    """
