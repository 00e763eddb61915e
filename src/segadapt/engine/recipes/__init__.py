"""Training recipes, by config name (``recipe: source_only``)."""

from __future__ import annotations

from ...errors import ConfigError
from .adversarial import AdversarialWarmup
from .base import Recipe, Stream
from .bicl import BiCL
from .cpsl import CPSL
from .dacs import DACS
from .distill import BiCLDistill, CPSLDistill
from .self_training import SelfTraining
from .source_only import Oracle, SourceOnly

RECIPES: dict[str, type[Recipe]] = {cls.name: cls for cls in (SourceOnly, Oracle, SelfTraining, CPSL, AdversarialWarmup, CPSLDistill, DACS, BiCL, BiCLDistill)}


def recipe_class(name: str) -> type[Recipe]:
    if name not in RECIPES:
        raise ConfigError(f"recipe: unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


__all__ = ["RECIPES", "Recipe", "Stream", "recipe_class"]
