"""NaN/±Inf: refused as each tensor is read (naming model and tensor), in the output, in recipes; nothing written."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from searchmerge.cli import main
from searchmerge.errors import NonFiniteError, RecipeError
from searchmerge.merge import merge
from searchmerge.recipe import Recipe
from tests.helpers import perturbed, tiny_state


def _zoo(tmp_path, poison=None):
    base = tiny_state(0)
    fts = [perturbed(base, 0.1, s) for s in (1, 2)]
    if poison is not None:
        fts[1]["layers.1.w"][0, 0] = poison
    paths = []
    for name, sd in [("base", base), ("a", fts[0]), ("b", fts[1])]:
        d = tmp_path / name
        d.mkdir()
        save_file(sd, str(d / "model.safetensors"))
        paths.append(d)
    return paths


def _recipe(paths, **params):
    return Recipe(method="task_arithmetic", base_model=str(paths[0]), models=[{"model": str(p)} for p in paths[1:]],
                  parameters=params)


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_non_finite_checkpoint_is_refused_naming_model_and_tensor(tmp_path, poison):
    paths = _zoo(tmp_path, poison)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"tensor layers\.1\.w of models\[1\] \(.*/b\) holds non-finite values"):
        merge(_recipe(paths), out=out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left behind


def test_allow_non_finite_merges_anyway(tmp_path):
    paths = _zoo(tmp_path, math.nan)
    merged = merge(_recipe(paths), allow_non_finite=True)
    assert torch.isnan(merged["layers.1.w"]).any()


def test_cli_refuses_then_allow_flag_merges(tmp_path, capsys):
    paths = _zoo(tmp_path, math.nan)
    f = tmp_path / "r.yaml"
    f.write_text(_recipe(paths).to_yaml())
    assert main(["merge", str(f), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-non-finite" in err[0] and "layers.1.w" in err[0]
    assert not (tmp_path / "out").exists()
    assert main(["merge", str(f), "--out", str(tmp_path / "out"), "--quiet", "--allow-non-finite"]) == 0


def test_overflow_in_float16_output_is_refused_naming_the_tensor(tmp_path):
    paths = _zoo(tmp_path)
    recipe = _recipe(paths, **{"lambda": 1e6})  # finite in float32, beyond float16's 65504
    with pytest.raises(NonFiniteError, match=r"merged tensor \S+ is not finite in float16 although every input is"):
        merge(recipe, out=tmp_path / "out", out_dtype="float16")
    assert not (tmp_path / "out").exists()
    assert merge(recipe, out_dtype="float32")["layers.0.w"].isfinite().all()


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1.0e+999"])
def test_non_finite_recipe_parameters_are_refused_at_validation(value):
    with pytest.raises(RecipeError, match="must be a finite number"):
        Recipe.from_yaml(f"method: task_arithmetic\nbase_model: b\nmodels: [{{model: a}}]\nparameters: {{lambda: {value}}}\n")
    with pytest.raises(RecipeError, match="finite"):
        Recipe(method="ties", base_model="b", models=[{"model": "a", "parameters": {"weight": [0.1, float("nan")]}}])


def test_state_dict_inputs_are_checked_too():
    base = tiny_state(0)
    bad = perturbed(base, 0.1, 1)
    bad["layers.0.b"][1] = math.inf
    recipe = Recipe(method="ties", base_model="base", models=[{"model": "m"}], parameters={"density": 0.5})
    with pytest.raises(NonFiniteError, match=r"layers\.0\.b of models\[0\] \(m\)"):
        merge(recipe, base=base, models=[bad])


@pytest.mark.timeout(300)
def test_store_refuses_non_finite_once_at_build(ray_session):
    from searchmerge.store import TaskVectorStore

    base = tiny_state(0)
    bad = perturbed(base, 0.1, 1)
    bad["layers.2.w"][1, 1] = math.nan
    with pytest.raises(NonFiniteError, match=r"layers\.2\.w of models\[1\] \(m1\)"):
        TaskVectorStore.build(base, [perturbed(base, 0.1, 2), bad], names=["m0", "m1"], cpus_per_actor=0.1,
                              timeout_s=120)
    with TaskVectorStore.build(base, [bad], names=["m1"], cpus_per_actor=0.1, timeout_s=120,
                               allow_non_finite=True) as store:
        recipe = Recipe(method="task_arithmetic", base_model="base", models=[{"model": "m1"}])
        assert torch.isnan(store.merge(recipe)["layers.2.w"]).any()
