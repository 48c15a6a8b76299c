"""Registry semantics and plugin discovery through real entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import attrs
import pytest

from dfmkit.components.tokenizers.identity import IdentityOptions
from dfmkit.errors import DuplicateComponentError, UnknownComponentError
from dfmkit.hookspecs import hookimpl
from dfmkit.plugins import PluginManager
from dfmkit.registry import BUILTIN, Registries, Registry


@attrs.define
class Opts:
    steps: int = 3


def test_register_and_build():
    registry = Registry("sampler")
    registry.register("euler", lambda options, **ctx: ("built", options.steps, ctx), options=Opts)
    assert "euler" in registry and registry.names() == ["euler"]
    assert registry.get("euler").build(Opts(steps=5), recipe="r") == ("built", 5, {"recipe": "r"})
    assert registry.get("euler").build() == ("built", 3, {})
    with pytest.raises(TypeError, match="takes Opts"):
        registry.get("euler").build({"steps": 1})


def test_unknown_name_lists_components_and_closest_match():
    registry = Registry("sampler")
    for name in ("edm-heun", "edm-euler", "dpm-solver++"):
        registry.register(name, dict)
    with pytest.raises(UnknownComponentError) as info:
        registry.get("edm-huen")
    message = str(info.value)
    assert "unknown sampler 'edm-huen'" in message
    assert "did you mean 'edm-heun'?" in message
    assert "Available: dpm-solver++, edm-euler, edm-heun." in message


def test_duplicate_name_names_both_origins():
    registries = Registries()
    registries.sampler.register("heun", dict)
    staged = registries.staged("dfmkit-extra 2.0")
    staged.sampler.register("heun", dict)
    with pytest.raises(DuplicateComponentError, match=r"by built-in and by dfmkit-extra 2\.0"):
        registries.merge(staged)
    with pytest.raises(DuplicateComponentError, match="registered twice"):
        registries.sampler.register("heun", dict)


def test_options_must_be_attrs_without_name_field():
    registry = Registry("tokenizer")
    with pytest.raises(TypeError, match="attrs class"):
        registry.register("bad", dict, options=dict)

    @attrs.define
    class Named:
        name: str = "x"

    with pytest.raises(TypeError, match="'name'"):
        registry.register("bad", dict, options=Named)


def test_lazy_factory_is_imported_on_build():
    registry = Registry("tokenizer")
    entry = registry.register("lazy", "dfmkit.components.tokenizers.identity:build", options=IdentityOptions)
    tokenizer = entry.build()
    assert tokenizer.latent_channels == 3


def test_builtins_register_through_the_hook():
    manager = PluginManager(entry_points=False)
    identity = manager.registries.tokenizer.get("identity")
    assert identity.origin == BUILTIN
    assert manager.failures == []


class _Raises:
    @hookimpl
    def dfmkit_register(self, registries):
        registries.sampler.register("half-done", dict)
        raise RuntimeError("boom while registering")


class _Duplicates:
    @hookimpl
    def dfmkit_register(self, registries):
        registries.tokenizer.register("identity", dict)


def test_failing_plugin_is_skipped_and_builtins_stay():
    manager = PluginManager(entry_points=False, extra=[(_Raises(), "bad-dist 0.1"), (_Duplicates(), "dup-dist 0.2")])
    assert "half-done" not in manager.registries.sampler  # nothing of a failing plugin is kept
    assert manager.registries.tokenizer.get("identity").origin == BUILTIN
    messages = [f.message() for f in manager.failures]
    assert any("bad-dist 0.1" in m and "RuntimeError: boom while registering" in m for m in messages)
    assert any("dup-dist 0.2" in m and "by built-in and by dup-dist 0.2" in m for m in messages)
    with pytest.raises(UnknownComponentError, match="Plugins skipped: .*bad-dist"):
        manager.registries.sampler.get("half-done")


def _write_distribution(root, dist, version, module, code, entry_name):
    """A minimal installed distribution: a module plus a dist-info with an entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(code))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[dfmkit]\n{entry_name} = {module}\n")
    (info / "RECORD").write_text("")


def test_entry_point_plugins_found_and_broken_one_reported(tmp_path):
    _write_distribution(tmp_path, "dfmkit-good", "1.2.3", "dfmkit_good_plugin", """
        import attrs
        from dfmkit import hookimpl

        @attrs.define
        class HalfStepOptions:
            '''Takes half a step.'''
            steps: int = 4

        def build(options, **context):
            return options

        @hookimpl
        def dfmkit_register(registries):
            registries.sampler.register("half-step", build, options=HalfStepOptions)
        """, "good")
    _write_distribution(tmp_path, "dfmkit-broken", "0.0.1", "dfmkit_broken_plugin",
                        "import a_module_that_does_not_exist\n", "broken")
    script = "import json; from dfmkit.plugins import PluginManager as P; m = P(); " \
             "print(json.dumps({'rows': m.describe(), 'failures': [f.message() for f in m.failures]}))"
    env_path = f"{tmp_path}"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": env_path})
    result = json.loads(out.stdout)
    rows = {(r["kind"], r["name"]): r for r in result["rows"]}
    assert rows[("sampler", "half-step")]["origin"] == "dfmkit-good 1.2.3"
    assert rows[("sampler", "half-step")]["summary"] == "Takes half a step."
    assert rows[("tokenizer", "identity")]["origin"] == "built-in"
    assert len(result["failures"]) == 1
    failure = result["failures"][0]
    assert "dfmkit-broken 0.0.1" in failure and "ModuleNotFoundError" in failure
    assert "a_module_that_does_not_exist" in failure
