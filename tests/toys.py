"""Small stand-in components of each kind, for tests of the recipe machinery (imported as ``toys``)."""

from __future__ import annotations

import math

import attrs

from dfmkit.hookspecs import hookimpl
from dfmkit.recipe import FloatOrInf


@attrs.define(kw_only=True)
class ToySamplerOptions:
    """A sampler's options, for recipe tests."""

    num_steps: int = 35
    sigma_max: float = 80.0
    s_max: FloatOrInf = math.inf  # documented as taking inf (no upper bound), as edm-heun's s_max


@attrs.define(kw_only=True)
class ToyLiteSamplerOptions:
    """Another sampler's options: num_steps as the toy sampler (but at most 20), no sigma_max, an order."""

    num_steps: int = attrs.field(default=10, validator=attrs.validators.le(20))
    order: int = 1


@attrs.define(kw_only=True)
class ToyBackboneOptions:
    """A backbone's options, for recipe tests."""

    num_layers: int = 2
    attention: str = "torch"
    widths: list[int] = attrs.Factory(lambda: [8, 16])

    def recipe_problems(self, recipe, registries) -> list[str]:
        problems = []
        if self.attention not in registries.attention:
            problems.append(f"attention: unknown attention '{self.attention}'; no such backend is registered")
        problems += [f"widths: {w} is wider than data.seq_length ({recipe.data.seq_length})"
                     for w in self.widths if w > recipe.data.seq_length]
        return problems


class ToyComponents:
    """A plugin that registers one component of each kind under names prefixed 'toy-'."""

    @hookimpl
    def dfmkit_register(self, registries):
        registries.backbone.register("toy-backbone", dict, options=ToyBackboneOptions)
        registries.sampler.register("toy-sampler", dict, options=ToySamplerOptions)
        registries.sampler.register("toy-sampler-lite", dict, options=ToyLiteSamplerOptions)
        registries.text_encoder.register("toy-text", dict)
        registries.task_encoder.register("toy-packer", dict)


TOY_SECTIONS = {
    "model": {"name": "toy-backbone"},
    "sampler": {"name": "toy-sampler"},
    "tokenizer": {"name": "identity"},
    "text_encoder": {"name": "toy-text"},
    "task_encoder": {"name": "toy-packer"},
}
