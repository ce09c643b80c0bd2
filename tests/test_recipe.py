"""Recipes: validation errors, YAML round trips, gradients and conditionals, MergeKit in and out."""

from __future__ import annotations

import pytest
import yaml

from searchmerge.errors import RecipeError
from searchmerge.mergekit import from_mergekit, to_mergekit, to_mergekit_yaml
from searchmerge.recipe import Recipe, interpolate_gradient, layer_fraction, load_recipe, resolve_params

MODELS = [{"model": "a"}, {"model": "b"}]


def test_yaml_round_trip_is_exact():
    r = Recipe(
        method="ties", base_model="base",
        models=[{"model": "a", "parameters": {"weight": [0.2, 0.8], "density": 0.4}},
                {"model": "b", "parameters": {"weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.3}]}}],
        parameters={"lambda": 0.9, "merge_func": "sum", "trim_scope": "tensor"}, seed=5, out_dtype="bfloat16",
    )
    assert Recipe.from_yaml(r.to_yaml()) == r


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="nope", base_model="x", models=MODELS), "unknown merge method `nope`"),
        (dict(method="ties", base_model="x", models=MODELS, parameters={"density": 1.5}), r"density.*\(0, 1\].*1.5"),
        (dict(method="ties", models=MODELS), "needs a `base_model`"),
        (dict(method="slerp", base_model="x", models=MODELS), "at most 1 model"),
        (dict(method="ties", base_model="x", models=[]), "at least 1 model"),
        (dict(method="ties", base_model="x", models=MODELS, parameters={"densty": 0.5}), "no parameter `densty`"),
        (dict(method="ties", base_model="x", models=MODELS, parameters={"merge_func": "avg"}), "merge_func"),
        (dict(method="ties", base_model="x", models=[{"model": "a", "parameters": {"lambda": 2}}]), "global parameter"),
        (dict(method="ties", base_model="x", models=MODELS, parameters={"lambda": "big"}), "must be a number"),
        (dict(method="ties", base_model="x", models=MODELS, parameters={"density": [0.2, 1.4]}), "1.4"),
        (dict(method="ties", base_model="x", models=MODELS, parameters={"density": [0.2, 0.5], "trim_scope": "model"}),
         "single value per model"),
    ],
)
def test_bad_recipes_are_refused_with_a_clear_message(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        Recipe(**kwargs)


def test_unknown_top_level_key_is_refused():
    with pytest.raises(RecipeError, match="mergemethod"):
        Recipe.from_yaml("method: ties\nbase_model: x\nmodels: [{model: a}]\nmergemethod: 1\n")


def test_gradient_interpolates_over_layers_like_mergekit():
    assert interpolate_gradient([0.0, 1.0], 0.5) == 0.5
    assert interpolate_gradient([1.0, 0.7, 0.1], 0.25) == pytest.approx(0.85)
    assert interpolate_gradient([1.0, 0.7, 0.1], 1.0) == pytest.approx(0.1)
    assert [layer_fraction(f"model.layers.{i}.mlp.weight", 5) for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert layer_fraction("model.embed_tokens.weight", 5) == 0.0
    assert layer_fraction("lm_head.weight", 5) == 0.0  # MergeKit plans non-layer tensors at t=0
    assert layer_fraction("model.layers.0.mlp.weight", 1) == 1.0


def test_conditionals_first_match_wins_then_fallback_then_global():
    r = Recipe(method="task_arithmetic", base_model="x",
               models=[{"model": "a", "parameters": {"weight": [{"filter": "attn", "value": 0.1},
                                                                {"filter": "mlp", "value": [0.0, 1.0]}]}},
                       {"model": "b"}],
               parameters={"weight": 0.5, "lambda": [{"filter": "attn", "value": 2.0}, {"filter": "*", "value": 1.0}]})
    assert resolve_params(r, "h.0.attn.w", 0.0) == {"weight": [0.1, 0.5], "lambda": 2.0, "normalize": False}
    assert resolve_params(r, "h.0.mlp.w", 0.5)["weight"] == [0.5, 0.5]
    assert resolve_params(r, "ln_f.weight", 0.0)["weight"] == [0.5, 0.5]  # no match -> global value
    assert resolve_params(r, "ln_f.weight", 0.0)["lambda"] == 1.0


MERGEKIT_TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_mergekit_ties_example_imports():
    r = from_mergekit(MERGEKIT_TIES)
    assert r.method == "ties" and r.base_model == "TheBloke/Llama-2-13B-fp16" and len(r.models) == 3
    assert r.parameters == {"merge_func": "mean"} and r.dtype == "float16"
    p = resolve_params(r, "model.layers.20.mlp.up_proj.weight", 0.5)
    assert p["density"] == [pytest.approx(0.7), 0.5, 0.33]
    assert p["weight"] == [1.0, pytest.approx(0.5), 0.5]


def test_mergekit_slerp_lists_base_among_models():
    cfg = {
        "merge_method": "slerp", "base_model": "A",
        "models": [{"model": "A"}, {"model": "B"}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]},
        "dtype": "bfloat16",
    }
    r = from_mergekit(cfg)
    assert r.model_paths == ["B"]
    back = to_mergekit(r)
    assert back["models"] == [{"model": "A"}, {"model": "B"}]
    assert from_mergekit(back) == r


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "task_arithmetic", "breadcrumbs_ties", "linear"])
def test_mergekit_round_trip(method):
    params = {"weight": 0.5}
    if method in ("ties", "dare_ties", "della", "breadcrumbs_ties"):
        params["density"] = 0.6
    if method == "della":
        params["epsilon"] = 0.1
    r = Recipe(method=method, base_model=None if method == "linear" else "base",
               models=[{"model": "a", "parameters": {"weight": 0.3}}, {"model": "b"}], parameters=params)
    assert from_mergekit(yaml.safe_load(to_mergekit_yaml(r))) == r


@pytest.mark.parametrize(
    "params, match",
    [({"trim_scope": "model"}, "trim_scope"), ({"merge_func": "max"}, "merge_func"), ({"lambda": 0.3}, None)],
)
def test_export_refuses_what_mergekit_cannot_express(params, match):
    r = Recipe(method="ties", base_model="b", models=MODELS, parameters=params)
    if match is None:
        assert to_mergekit(r)["parameters"]["lambda"] == 0.3
    else:
        with pytest.raises(RecipeError, match=match):
            to_mergekit(r)


def test_mergekit_unsupported_method_and_slices():
    with pytest.raises(RecipeError, match="passthrough"):
        from_mergekit({"merge_method": "passthrough", "slices": []})
    with pytest.raises(RecipeError, match="slices"):
        from_mergekit({"merge_method": "linear", "slices": [{"sources": []}]})


def test_load_recipe_detects_mergekit_and_missing_file(tmp_path):
    f = tmp_path / "mk.yaml"
    f.write_text(MERGEKIT_TIES)
    assert load_recipe(f).method == "ties"
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_yaml_cannot_instantiate_objects(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("method: !!python/object/apply:os.system ['echo hi']\nmodels: []\n")
    with pytest.raises(RecipeError, match=r"evil.yaml:1:9: YAML tag `!!python/object/apply:os.system` is not allowed"):
        load_recipe(f)
