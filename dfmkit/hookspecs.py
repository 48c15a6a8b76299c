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

# attrs field metadata key of an options field that only changes how a component computes, not what it is
COMPUTATION_ONLY = "dfmkit_computation_only"
# attrs field metadata key of an objective's option that fixes what the network computes (its preconditioning or
# the scale of its noise input): a checkpoint trained with one value is refused under another
DEFINES_MODEL = "dfmkit_defines_model"


@hookspec
def dfmkit_register(registries: Registries) -> None:
    """Add components to the registries.

    ``registries`` has one :class:`~dfmkit.registry.Registry` per kind: ``backbone``,
    ``objective``, ``sampler``, ``tokenizer``, ``text_encoder``, ``task_encoder`` and ``attention``.
    Register with ``registries.sampler.register("my-sampler", build, options=MyOptions)``
    where ``MyOptions`` is an attrs class of the options the recipe section may set and
    ``build(options, **context)`` returns the component; ``context`` holds what the caller has (``recipe``, the
    job's ``registries``, ...), so factories take ``**context`` and ignore what they do not use.

    Recipes check an options class's fields as they read them (types, attrs validators, finite floats;
    type a float ``dfmkit.recipe.FloatOrInf`` where inf means something). Mistakes that need more than the
    section itself are found by optional methods of the options class, which ``load_recipe`` calls so that
    every mistake of a recipe is reported at once, before a run starts (:mod:`dfmkit.recipe_checks`):

    - ``recipe_problems(self, recipe, registries) -> list[str]``: problems given the whole recipe and the
      job's registries, each ``"key: what is wrong, and the fix"`` with ``key`` relative to the component's
      section (``"attention: unknown attention 'x'..."`` is reported as ``model.attention: ...``).
    - on a tokenizer's options, ``latent_shape(self, frames, height, width) -> (C, T, H, W)``: the latent of
      a video of that size, raising ``DfmkitError``/``ValueError`` for sizes the tokenizer does not take;
      with it, the recipe's validation sizes are checked when it is loaded rather than when training
      reaches its first validation.

    A backbone's options mark the fields that change only how the model is computed, not what it is (attention
    kernels, recomputation, compilation), with ``attrs.field(..., metadata={COMPUTATION_ONLY: True})``
    (``dfmkit.hookspecs.COMPUTATION_ONLY``): a run may resume a checkpoint with other values of those, while any
    other difference in the ``[model]`` section is refused (:mod:`dfmkit.train.resume`). An objective's options mark
    the fields that fix what its network computes (EDM's ``sigma_data``, rectified flow's ``time_scale``) with
    ``metadata={DEFINES_MODEL: True}``: resuming or generating from a checkpoint trained with another value is
    refused, while the objective's other options (training noise levels, the sampling grid) may change.
    """
