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


def test_a_check_names_the_patch_whose_library_attribute_went_missing_or_changed(monkeypatch):
    """What a check reports when the library changes under a patch: a private method gone, a signature changed; and
    after a patch replaced a library function (compat.replace) the check still reads the library's own one."""
    from megatron.core.distributed import DistributedDataParallel
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    from dfmkit.compat import megatron_ddp, torch_dcp

    monkeypatch.delattr(FileSystemReader, "_get_metadata_path")
    assert torch_dcp.check() == [
        "restricted_metadata: torch.distributed.checkpoint.filesystem.FileSystemReader has no '_get_metadata_path'"]
    monkeypatch.setattr(DistributedDataParallel, "_make_backward_post_hook", lambda self, parameter: None)
    assert megatron_ddp.check() == ["BatchedAccumulationDDP: megatron.core.distributed.distributed_data_parallel."
                                    "DistributedDataParallel._make_backward_post_hook has no parameter 'param'"]

    class Library:
        def function(self, param): ...

    monkeypatch.setattr(compat, "_originals", {})
    compat.replace(Library, "function", lambda self, other: None)
    assert compat.missing_parameters("patch", Library, "function", "param") == []
    assert compat.missing_parameters("patch", Library, "function", "other") == [
        f"patch: {Library.__module__}.{Library.__qualname__}.function has no parameter 'other'"]
