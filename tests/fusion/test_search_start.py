"""AdaMerging's coefficients as the first candidate of a recipe search."""

from __future__ import annotations

import pytest
import torch

from searchmerge.fusion.adamerging import AdaMergingResult, search_point
from searchmerge.search.space import build_space
from searchmerge.search.spec import SearchSpec, SearchSpecError


def _spec(**kw):
    return SearchSpec(bench="fixture", methods={"task_arithmetic": {"weight": [0.0, 1.0], "lambda": 1.0}},
                      granularity="per_model", searcher="optuna_cmaes", **kw)


def _result(coef, groups):
    from searchmerge.recipe import Recipe

    recipe = Recipe(method="task_arithmetic", base_model="base", models=[{"model": "a"}, {"model": "b"}],
                    parameters={"lambda": 1.0})  # what adamerge saves (search_point copies its fixed parameters)
    return AdaMergingResult(coefficients=torch.tensor(coef), groups=groups, recipe=recipe, merged={})


def test_task_wise_point_is_the_first_candidate():
    names = ["a", "b"]
    pt = search_point(_result([[0.4], [0.9]], [["x.weight"]]), names)
    space = build_space(_spec(points_to_evaluate=[pt]), names)
    cfg = space.point(pt)
    assert cfg == {"task_arithmetic.weight@a": 0.4000000059604645, "task_arithmetic.weight@b": 0.8999999761581421}
    recipe = space.to_recipe(cfg)
    assert recipe.parameters["lambda"] == 1.0
    assert [m.parameters["weight"] for m in recipe.models] == [pytest.approx(0.4), pytest.approx(0.9)]


def test_layer_wise_point_per_depth_group_and_clipped():
    names = ["a", "b"]
    groups = [["emb.weight"], ["layer.0.w"], ["layer.1.w"], ["layer.2.w"]]
    coef = [[0.1, 0.2, 0.4, 1.6], [0.5, 0.5, 0.5, 0.5]]
    pt = search_point(_result(coef, groups), names, layer_groups=2)
    assert pt["weight"]["a"] == [pytest.approx(0.15), pytest.approx(1.0)]  # knots: {emb, layer.0}, {layer.1, layer.2}
    space = build_space(_spec(layer_groups=2, points_to_evaluate=[pt]), names)
    cfg = space.point(pt)
    assert cfg["task_arithmetic.weight@a#1"] == 1.0  # 1.0 is the mean of 0.4 and 1.6, inside [0, 1]
    assert cfg["task_arithmetic.weight@b#0"] == 0.5


def test_unknown_model_in_a_point_is_refused():
    with pytest.raises(SearchSpecError, match="unknown model"):
        build_space(_spec(points_to_evaluate=[{"method": "task_arithmetic", "weight": {"zzz": 0.3}}]), ["a", "b"])
