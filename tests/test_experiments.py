"""Every recipe under experiments/ parses and validates (files are checked at merge time)."""

from __future__ import annotations

from pathlib import Path

import pytest

from searchmerge.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "experiments" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_experiment_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.models
