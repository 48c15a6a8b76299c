"""Built-in text encoders, registered through the ``dfmkit_register`` hook like any plugin.

The protocol is :class:`~dfmkit.components.text_encoders.base.TextEncoder`; wrap any encoder in
:class:`~dfmkit.components.text_encoders.cache.EmbeddingCache` to avoid re-encoding texts.
"""

from dfmkit.components.text_encoders.t5 import T5Options
from dfmkit.components.text_encoders.t5_tiny import T5TinyOptions
from dfmkit.hookspecs import hookimpl


@hookimpl
def dfmkit_register(registries):
    registries.text_encoder.register(
        "t5", "dfmkit.components.text_encoders.t5:build", options=T5Options,
        summary="frozen transformers T5 encoder (google-t5/t5-11b by default), states at their true length",
    )
    registries.text_encoder.register(
        "t5-tiny", "dfmkit.components.text_encoders.t5_tiny:build", options=T5TinyOptions,
        summary="small seeded random T5 with a vocabulary trained on a given corpus; offline quickstart and tests",
    )
