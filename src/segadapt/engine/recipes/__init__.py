"""Training recipes, by config name (``recipe: source_only``)."""

from __future__ import annotations

from ...errors import ConfigError
from .base import Recipe, Stream
from .self_training import SelfTraining
from .source_only import Oracle, SourceOnly

RECIPES: dict[str, type[Recipe]] = {cls.name: cls for cls in (SourceOnly, Oracle, SelfTraining)}


def recipe_class(name: str) -> type[Recipe]:
    if name not in RECIPES:
        raise ConfigError(f"recipe: unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


__all__ = ["RECIPES", "Recipe", "Stream", "recipe_class"]
