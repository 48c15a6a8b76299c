"""Built-in tokenizers, registered through the ``dfmkit_register`` hook like any plugin."""

from dfmkit.components.tokenizers.identity import IdentityOptions
from dfmkit.hookspecs import hookimpl


@hookimpl
def dfmkit_register(registries):
    registries.tokenizer.register(
        "identity", "dfmkit.components.tokenizers.identity:build", options=IdentityOptions,
        summary="pixels as latents (3 channels, scaled); for the offline quickstart and tests",
    )
