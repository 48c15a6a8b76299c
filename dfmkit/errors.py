"""Errors a user can cause and fix: the CLI prints them as one message, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DfmkitError(Exception):
    """Base class of every error that names the user's mistake and its fix."""


class RecipeError(DfmkitError):
    """A recipe (TOML file, dict or override) that does not fit the schema."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            super().__init__(f"{where}{self.problems[0]}")
        else:
            body = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{where}{len(self.problems)} problems in the recipe:\n{body}")


class GenerateError(DfmkitError):
    """Generation settings, prompts or sources that cannot work (the message says what to change)."""


class UnknownComponentError(DfmkitError):
    """A component name that no registry entry has."""


class DuplicateComponentError(DfmkitError):
    """Two origins register the same name for one kind of component."""


class PluginError(DfmkitError):
    """A plugin that could not be loaded or that failed while registering."""


class CheckpointError(DfmkitError):
    """A checkpoint that is missing, incomplete, or does not fit the model (:mod:`dfmkit.train.checkpoint`)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``word``, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None
