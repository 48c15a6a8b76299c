"""Built-in task encoders, registered through the ``dfmkit_register`` hook like any plugin.

The module of a task encoder is imported only when it is built (it needs megatron-energon).
"""

import attrs

from dfmkit.hookspecs import hookimpl


@attrs.define(kw_only=True)
class PackedOptions:
    """Energon task encoder: decode, check, patchify, pad and pack samples (first-fit decreasing) into thd sequences."""

    max_text_tokens: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # cut longer text states (0: keep all)
    max_abs_latent: float = attrs.field(default=1e3, validator=attrs.validators.ge(0))  # skip larger |latent| (0: no bound)
    text_dim: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # expected width; 0: from the dataset's dfmkit.json
    latent_channels: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # 0: from the dataset's dfmkit.json
    shuffle_packs: bool = True  # shuffle the packs of one packing round (seeded by their keys)


@hookimpl
def dfmkit_register(registries):
    registries.task_encoder.register(
        "packed", "dfmkit.components.task_encoders.packed:build", options=PackedOptions,
        summary="Energon task encoder: decode, check, patchify, pad, first-fit-decreasing thd packing",
    )
