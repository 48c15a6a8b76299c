"""Built-in backbones, registered through the ``dfmkit_register`` hook like any plugin."""

from dfmkit.components.backbones.options import PRESETS, DiTOptions
from dfmkit.hookspecs import hookimpl


@hookimpl
def dfmkit_register(registries):
    registries.backbone.register(
        "dit", "dfmkit.components.backbones.dit:build", options=DiTOptions,
        summary="DiT (adaLN-Zero, cross-attention to text) on megatron-core; presets tiny/S/B/L/XL",
    )


__all__ = ["PRESETS", "DiTOptions", "dfmkit_register"]
