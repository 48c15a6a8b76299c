"""Shared fixtures: a plugin manager with small stand-in components for testing recipe machinery."""

from __future__ import annotations

import attrs
import pytest
import torch

from dfmkit.hookspecs import hookimpl
from dfmkit.plugins import PluginManager


@attrs.define(kw_only=True)
class ToySamplerOptions:
    """A sampler's options, for recipe tests."""

    num_steps: int = 35
    sigma_max: float = 80.0


@attrs.define(kw_only=True)
class ToyBackboneOptions:
    """A backbone's options, for recipe tests."""

    num_layers: int = 2
    attention: str = "torch"
    widths: list[int] = attrs.Factory(lambda: [8, 16])


class ToyComponents:
    """A plugin that registers one component of each kind under names prefixed 'toy-'."""

    @hookimpl
    def dfmkit_register(self, registries):
        registries.backbone.register("toy-backbone", dict, options=ToyBackboneOptions)
        registries.sampler.register("toy-sampler", dict, options=ToySamplerOptions)
        registries.text_encoder.register("toy-text", dict)
        registries.task_encoder.register("toy-packer", dict)


TOY_SECTIONS = {
    "model": {"name": "toy-backbone"},
    "sampler": {"name": "toy-sampler"},
    "tokenizer": {"name": "identity"},
    "text_encoder": {"name": "toy-text"},
    "task_encoder": {"name": "toy-packer"},
}


@pytest.fixture
def toy_plugins() -> PluginManager:
    return PluginManager(entry_points=False, extra=[(ToyComponents(), "toy-dist 1.0")])


@pytest.fixture
def one_thread():
    """For files of many small tensor ops: one thread is fastest, and stays fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
