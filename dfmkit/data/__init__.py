"""Data: dataset preparation (``dfmkit prepare``), the Energon training loader, and mock data.

- :mod:`dfmkit.data.prepare`: sources -> tokenizer + text encoder -> WebDataset shards + Energon index
- :mod:`dfmkit.data.sources`: digits (offline), Hugging Face / parquet, folders of images and videos
- :mod:`dfmkit.data.shards`: the on-disk sample layout (safetensors / npy / json; no pickle)
- :mod:`dfmkit.data.loader`: ``build_train_loader`` (DP-aware, savable state as JSON)
- :mod:`dfmkit.data.mock`: random batches of configured sizes for benchmarks
- :mod:`dfmkit.data.skips`: skipped samples counted by reason, each bad sample once

The ``packed`` task encoder that turns samples into thd-packed sequences is a component:
:mod:`dfmkit.components.task_encoders.packed`. Here: what the loader, the mock data and the task encoder share
(the backbone's input sizes, :func:`check_fits_model`, :class:`DataError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dfmkit.errors import DfmkitError


class DataError(DfmkitError):
    """A dataset folder that cannot be loaded (missing, not prepared, empty split), or data that does not fit the
    model."""


def model_dims(recipe: Any) -> tuple[int | None, int | None]:
    """(latent channels, text width) the recipe's backbone expects, where its options say (``in_channels``, ``text_dim``)."""
    options = getattr(getattr(recipe, "model", None), "options", None)
    channels, width = getattr(options, "in_channels", None), getattr(options, "text_dim", None)
    return (int(channels) if channels else None), (int(width) if width else None)


def check_fits_model(recipe: Any, info: Mapping[str, Any], what: str, hint: str = "") -> None:
    """A clear error when the data's latent channels or text width differ from what the backbone takes."""
    channels, width = model_dims(recipe)
    problems = []
    if channels and info.get("latent_channels") and int(info["latent_channels"]) != channels:
        problems.append(f"{what} has {info['latent_channels']}-channel latents but model.in_channels = {channels}")
    if width and info.get("text_dim") and int(info["text_dim"]) != width:
        problems.append(f"{what} has text states of width {info['text_dim']} but model.text_dim = {width}")
    if problems:
        hint = hint or "prepare the data with this recipe's tokenizer and text encoder, or change the model options"
        raise DataError("; ".join(problems) + f" ({hint})")
