"""Training recipes, by config name (``recipe: source_only``)."""

from __future__ import annotations

from ...config import RunConfig
from ...errors import ConfigError, did_you_mean
from .adversarial import AdversarialWarmup
from .base import Recipe, Stream, parse_options
from .bicl import BiCL, BiCLDistill
from .cpsl import CPSL
from .dacs import DACS, HRDA, DAFormer
from .distill import CPSLDistill
from .self_training import SelfTraining
from .source_only import Oracle, SourceOnly

RECIPES: dict[str, type[Recipe]] = {
    cls.name: cls for cls in (SourceOnly, Oracle, SelfTraining, CPSL, AdversarialWarmup, CPSLDistill, DACS, DAFormer, HRDA, BiCL, BiCLDistill)
}


def recipe_class(name: str) -> type[Recipe]:
    """The recipe registered as ``name``; a ConfigError naming the closest one otherwise."""
    if name not in RECIPES:
        raise ConfigError(f"recipe: unknown recipe {name!r}{did_you_mean(name, RECIPES)} (recipes: {', '.join(sorted(RECIPES))})")
    return RECIPES[name]


def check_recipe_config(cfg: RunConfig) -> None:
    """Check ``recipe`` and the ``method`` section against the recipe's options.

    config.py cannot know the recipes' option schemas (it must not import the engine); the trainer
    and ``segadapt rounds`` (for every round, up front) call this before a run directory exists.
    """
    cls = recipe_class(cfg.recipe)
    parse_options(cls.Options, cfg.method, cls.name)
    check_masked_consistency(cls, cfg)


def check_masked_consistency(cls: type[Recipe], cfg: RunConfig) -> None:
    """``mic.enabled`` needs a recipe with target pseudo labels (MIC trains on them); a ConfigError otherwise."""
    if cfg.mic.enabled and not cls.masked_consistency:
        hosts = ", ".join(sorted(name for name, recipe in RECIPES.items() if recipe.masked_consistency))
        raise ConfigError(
            f"mic.enabled: recipe {cls.name} has no target pseudo labels for masked image consistency; "
            f"use one of {hosts}, or set mic.enabled=false"
        )


__all__ = ["RECIPES", "Recipe", "Stream", "check_masked_consistency", "check_recipe_config", "recipe_class"]
