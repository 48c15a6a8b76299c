"""Built-in tokenizers, registered through the ``dfmkit_register`` hook like any plugin."""

from dfmkit.components.tokenizers.cosmos import CosmosOptions
from dfmkit.components.tokenizers.identity import IdentityOptions
from dfmkit.hookspecs import hookimpl


@hookimpl
def dfmkit_register(registries):
    registries.tokenizer.register(
        "identity", "dfmkit.components.tokenizers.identity:build", options=IdentityOptions,
        summary="pixels as latents (3 channels, scaled); for the offline quickstart and tests",
    )
    registries.tokenizer.register(
        "cosmos", "dfmkit.components.tokenizers.cosmos:build", options=CosmosOptions,
        summary="NVIDIA Cosmos continuous tokenizer from encoder.jit/decoder.jit (CV4x8x8; CV8x8x8, CI8x8, CI16x16)",
    )
