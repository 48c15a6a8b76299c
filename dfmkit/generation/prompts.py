"""Prompts: what to generate (a :class:`Request` per output, from prompt strings, files and sizes) and the
text states the model is conditioned on."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from dfmkit.errors import GenerateError
from dfmkit.recipe import Recipe


@attrs.frozen
class Request:
    """One output to generate: a prompt and its size in pixels (``frames`` video frames)."""

    prompt: str
    height: int
    width: int
    frames: int


def read_prompt_file(path: str | os.PathLike[str]) -> list[str | dict[str, Any]]:
    """Prompts from a file: one per line (blank lines skipped), or, for ``.jsonl``, one JSON object per
    line with ``"prompt"`` and optionally ``"height"``, ``"width"`` and ``"frames"``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GenerateError(f"cannot read the prompt file '{path}': {exc.strerror or exc}") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line]
    if not lines:
        raise GenerateError(f"the prompt file '{path}' holds no prompts (it is empty or only blank lines); "
                            "write one prompt per line")
    if path.suffix.lower() != ".jsonl":
        return [line for _, line in lines]
    prompts: list[str | dict[str, Any]] = []
    for number, line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GenerateError(f"{path}:{number}: not a JSON object ({exc.msg}); a .jsonl prompt file holds lines "
                                'such as {"prompt": "a red car", "height": 256, "width": 256}') from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise GenerateError(f'{path}:{number}: each line needs a "prompt" string, got {line[:80]!r}')
        unknown = set(item) - {"prompt", "height", "width", "frames"}
        if unknown:
            raise GenerateError(f"{path}:{number}: unknown keys {sorted(unknown)}; use prompt, height, width, frames")
        prompts.append(item)
    return prompts


def _per_prompt(name: str, value: int | Sequence[int] | None, count: int) -> list[int | None]:
    if value is None:
        return [None] * count
    if isinstance(value, int):
        return [value] * count
    values = list(value)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise GenerateError(f"{len(values)} values of {name} for {count} prompts: give one value for all prompts "
                            "or one per prompt")
    return values


def make_requests(
    prompts: str | Sequence[str | Mapping[str, Any]],
    *,
    height: int | Sequence[int] | None,
    width: int | Sequence[int] | None,
    frames: int | Sequence[int] | None,
    defaults: tuple[int, int, int],
) -> list[Request]:
    """Requests for ``prompts`` (strings, or mappings with "prompt" and optional sizes); a size given per
    prompt in a mapping wins over ``height``/``width``/``frames`` (one value, or one per prompt), which
    win over ``defaults`` (frames, height, width)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise GenerateError("no prompts: give at least one prompt (--prompt TEXT or --prompt-file FILE)")
    sizes = {"height": _per_prompt("height", height, len(prompts)),
             "width": _per_prompt("width", width, len(prompts)),
             "frames": _per_prompt("frames", frames, len(prompts))}
    default = {"frames": defaults[0], "height": defaults[1], "width": defaults[2]}
    requests = []
    for i, item in enumerate(prompts):
        spec = dict(item) if isinstance(item, Mapping) else {"prompt": item}
        if not isinstance(spec.get("prompt"), str):
            raise GenerateError(f"prompt {i} is not a string: {spec.get('prompt')!r}")
        values = {}
        for key in ("height", "width", "frames"):
            value = spec.get(key, sizes[key][i])
            value = default[key] if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenerateError(f"prompt {i}: {key} must be a positive integer, got {value!r}")
            values[key] = value
        requests.append(Request(prompt=spec["prompt"], **values))
    return requests


def encode_prompts(encoder: Any, prompts: Sequence[str], recipe: Recipe) -> list[Any]:
    """The text states (float32, CPU) ``encoder`` gives ``prompts``, checked against the width the recipe's model
    was trained on (``model.text_dim``)."""
    states = [s.float().cpu() for s in encoder.encode(list(prompts))]
    text_dim = getattr(recipe.model.options, "text_dim", None)
    if text_dim is not None and states and states[0].shape[-1] != text_dim:
        raise GenerateError(
            f"the text encoder '{recipe.text_encoder.name}' gives states of width {states[0].shape[-1]}, the "
            f"model was trained on width {text_dim} (model.text_dim); use the text encoder it was trained with")
    return states
