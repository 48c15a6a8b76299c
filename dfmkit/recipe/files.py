"""Recipe files: a path or the name of a packaged recipe (``quickstart_digits``), read as TOML."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from dfmkit.errors import RecipeError, did_you_mean

PACKAGED_RECIPES = Path(__file__).parents[1] / "recipes"


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped inside the package (usable as ``dfmkit run NAME``)."""
    return sorted(p.stem for p in PACKAGED_RECIPES.glob("*.toml"))


def resolve_recipe_path(recipe: str | os.PathLike[str]) -> Path:
    """A recipe file path, or the name of a packaged recipe such as ``quickstart_digits``."""
    path = Path(recipe)
    if path.is_file():
        return path
    packaged = PACKAGED_RECIPES / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    names = packaged_recipes()
    guess = did_you_mean(path.stem, names)
    hint = f" Did you mean '{guess}'?" if guess else ""
    raise RecipeError(
        [f"recipe file '{recipe}' not found.{hint} Give a path to a .toml file or a packaged recipe: {', '.join(names)}"]
    )


def read_recipe_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except UnicodeDecodeError as exc:
        raise RecipeError([f"not UTF-8 text (byte {exc.start}): a TOML recipe must be saved as UTF-8"],
                          str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"not valid TOML: {exc}"], str(path)) from None
    except OSError as exc:
        raise RecipeError([f"cannot read the recipe: {exc.strerror}"], str(path)) from None


