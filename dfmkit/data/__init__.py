"""Data: dataset preparation (``dfmkit prepare``), the Energon training loader, and mock data.

- :mod:`dfmkit.data.prepare`: sources -> tokenizer + text encoder -> WebDataset shards + Energon index
- :mod:`dfmkit.data.sources`: digits (offline), Hugging Face / parquet, folders of images and videos
- :mod:`dfmkit.data.shards`: the on-disk sample layout (safetensors / npy / json; no pickle)
- :mod:`dfmkit.data.loader`: ``build_train_loader`` (DP-aware, savable state as JSON)
- :mod:`dfmkit.data.mock`: random batches of configured sizes for benchmarks
- :mod:`dfmkit.data.skips`: skipped samples counted by reason

The ``packed`` task encoder that turns samples into thd-packed sequences is a component:
:mod:`dfmkit.components.task_encoders.packed`.
"""

from __future__ import annotations

from typing import Any


def patch_sizes(recipe: Any) -> tuple[int, int]:
    """(patch_spatial, patch_temporal) of the recipe's backbone; 2 and 1 (the reference's) if it has none."""
    options = getattr(getattr(recipe, "model", None), "options", None)
    return int(getattr(options, "patch_spatial", 2)), int(getattr(options, "patch_temporal", 1))


def model_dims(recipe: Any) -> tuple[int | None, int | None]:
    """(latent channels, text width) the recipe's backbone expects, where its options say (``in_channels``, ``text_dim``)."""
    options = getattr(getattr(recipe, "model", None), "options", None)
    channels, width = getattr(options, "in_channels", None), getattr(options, "text_dim", None)
    return (int(channels) if channels else None), (int(width) if width else None)
