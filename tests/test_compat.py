"""The library internals dfmkit patches are still there: each compat module's check() names what went missing."""

from __future__ import annotations

import importlib.metadata

import pytest

from dfmkit import compat


def test_every_compat_module_is_listed():
    import pkgutil

    found = {m.name for m in pkgutil.iter_modules(compat.__path__)}
    assert found == set(compat.MODULES), "list every module of dfmkit/compat in compat.MODULES"


@pytest.mark.parametrize("name", compat.MODULES)
def test_what_the_patches_rely_on_is_there(name):
    module = importlib.import_module(f"dfmkit.compat.{name}")
    assert module.__doc__ and "checked on" in module.__doc__.lower(), f"dfmkit.compat.{name}: say the versions"
    assert isinstance(module.CHECKED_ON, dict) and module.CHECKED_ON
    problems = module.check()
    if problems:
        versions = {d: importlib.metadata.version(d) for d in module.CHECKED_ON}
        pytest.fail(f"dfmkit.compat.{name} (checked on {module.CHECKED_ON}, installed {versions}):\n  "
                    + "\n  ".join(problems))
