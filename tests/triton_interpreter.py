"""Runs a kernel check in Triton's interpreter on the CPU, in a subprocess: the interpreter is chosen when the
kernels are defined, so it cannot be switched on inside a process that has imported them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

_INTERPRETED = """
import sys, numpy
import triton.runtime.interpreter as interpreter
patch = interpreter._patch_lang_tensor
def patched(tensor, *scope):  # NumPy 2 refuses int() of the one-element arrays Triton 3.5's interpreter loads scalars as
    patch(tensor, *scope)
    tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])
interpreter._patch_lang_tensor = patched
sys.path.insert(0, {tests!r})
import torch, {module} as t
t.{check}("cpu", torch.float32, {tolerance!r})
"""


def run_interpreted(module: str, check: str, tolerance: float = 1e-5) -> None:
    """``module.check("cpu", torch.float32, tolerance)`` under ``TRITON_INTERPRET=1``; fails with its stderr."""
    code = _INTERPRETED.format(tests=os.path.dirname(__file__), module=module, check=check, tolerance=tolerance)
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
