"""Checks of a recipe that read more than one value: across sections, and against the registries.

:func:`dfmkit.recipe.load_recipe` runs them once every section has been read, and reports their problems
together with every mistake of the sections themselves, so ``dfmkit recipe show`` and ``dfmkit run``
name all of a recipe's mistakes at once, before any work starts. A check that reads a section with
mistakes of its own is left out (that section's mistakes are reported instead).

Components take part through optional methods of their options class (see :mod:`dfmkit.hookspecs`):

- ``recipe_problems(self, recipe, registries) -> list[str]``: this component's mistakes given the whole
  recipe and the job's registries (an attention backend that is not registered, a size another section
  rules out). Each problem reads ``"key: what is wrong, and the fix"`` with ``key`` relative to the
  component's section; the loader puts the section's name in front (``model.attention: ...``).
- ``latent_shape(self, frames, height, width) -> (C, T, H, W)`` on a tokenizer's options: the latent of a
  video of that size, raising :class:`~dfmkit.errors.DfmkitError` or ``ValueError`` for sizes the
  tokenizer does not take. With it the validation sizes are checked here; without it, when the tokenizer
  is built.
- ``LOSS_SIGMAS`` on an objective's options: the validation loss's noise levels when ``validation.loss_sigmas`` is
  empty (without it, a recipe that validates must list them).
- ``sigma_problem(self, sigma) -> str | None`` on an objective's options: what is wrong with a noise level that
  ``validation.loss_sigmas`` names, in that objective's units (rectified flow's times are at most 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from dfmkit.latent_sizes import fit_latent, misfit_message, patch_sizes
from dfmkit.registry import Registries


class SectionUnavailable(Exception):
    """A check read a section that has mistakes of its own; the check is left out."""


class PartialRecipe:
    """The sections of a recipe that were read without mistakes; reading another one leaves the check out."""

    def __init__(self, sections: dict[str, Any], broken: Iterable[str]):
        self._sections = sections
        self._broken = set(broken)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._broken:
            raise SectionUnavailable(name)
        try:
            return self._sections[name]
        except KeyError:
            raise AttributeError(name) from None


def schedule_problem(optim: Any, train_iters: int) -> str | None:
    """The learning-rate schedule's mistake, if any: a warm-up that takes the whole run leaves no room to decay."""
    if optim.warmup_iters >= train_iters and optim.decay_style != "constant":
        return (f"optim.warmup_iters ({optim.warmup_iters}) must be smaller than train.train_iters ({train_iters}); "
                "lower the warm-up or set optim.decay_style = \"constant\"")
    return None


def _schedule(recipe: Any, registries: Registries) -> list[str]:
    problem = schedule_problem(recipe.optim, recipe.train.train_iters)
    return [problem] if problem else []


def _sequence_holds_a_sample(recipe: Any, registries: Registries) -> list[str]:
    parallel, seq_length = recipe.parallel, recipe.data.seq_length
    multiple = parallel.pad_multiple
    if seq_length >= multiple:
        return []
    why = f"parallel.context = {parallel.context} (2 x context)" if parallel.context > 1 else ""
    if parallel.sequence and parallel.tensor > 1:
        why += (" with " if why else "") + f"sequence parallelism over parallel.tensor = {parallel.tensor}"
    return [f"data.seq_length ({seq_length}) is smaller than {multiple}, the tokens each sample is padded to "
            f"for {why}; raise data.seq_length"]


def _validation_sizes(recipe: Any, registries: Registries) -> list[str]:
    validation = recipe.validation
    options = recipe.tokenizer.options
    if validation.interval <= 0 or not validation.prompts or not hasattr(options, "latent_shape"):
        return []  # a tokenizer whose options cannot tell is checked when validation builds it
    p, pt = patch_sizes(recipe.model.options)
    frames, height, width = validation.frames, validation.height, validation.width
    shape, reason, nearest = fit_latent(options, p, pt, frames, height, width)
    if shape is not None:
        return []
    keys = ", ".join(f"validation.{key}" for key in nearest) or "validation"
    message = f"{keys}: " + misfit_message(recipe.tokenizer.name, p, pt, frames, height, width, reason, nearest)
    return [message]


def _validation_noise_levels(recipe: Any, registries: Registries) -> list[str]:
    validation, options = recipe.validation, recipe.diffusion.options
    if (validation.interval > 0 and validation.loss_batches > 0 and not validation.loss_sigmas
            and not hasattr(options, "LOSS_SIGMAS")):
        return [f"validation.loss_sigmas: the objective '{recipe.diffusion.name}' names no default noise levels for "
                "the validation loss; list them here, or set validation.loss_batches = 0"]
    check = getattr(options, "sigma_problem", None)
    problems = [check(sigma) for sigma in recipe.validation.loss_sigmas] if check is not None else []
    return [f"validation.loss_sigmas: {problem} (diffusion.name = '{recipe.diffusion.name}')"
            for problem in problems if problem]


CHECKS: tuple[Callable[[Any, Registries], list[str]], ...] = (
    _schedule, _sequence_holds_a_sample, _validation_sizes, _validation_noise_levels,
)


def _component_problems(recipe: Any, registries: Registries, section: str) -> list[str]:
    options = getattr(recipe, section).options
    check = getattr(options, "recipe_problems", None)
    return [f"{section}.{problem}" for problem in check(recipe, registries)] if check is not None else []


def recipe_problems(recipe: Any, registries: Registries, component_sections: Iterable[str]) -> list[str]:
    """Every problem the checks find: each component's own (``recipe_problems``) first, then those across
    sections. ``recipe`` is a :class:`~dfmkit.recipe.Recipe` or a :class:`PartialRecipe`."""
    checks = [lambda s=section: _component_problems(recipe, registries, s) for section in component_sections]
    checks += [lambda c=check: c(recipe, registries) for check in CHECKS]
    problems = []
    for check in checks:
        try:
            problems += check()
        except SectionUnavailable:
            continue
    return problems
