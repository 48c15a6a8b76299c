"""Shared fixtures: a plugin manager with small stand-in components for testing recipe machinery."""

from __future__ import annotations

import pytest
import torch

from dfmkit.plugins import PluginManager
from toys import ToyComponents


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
