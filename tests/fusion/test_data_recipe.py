"""`searchmerge merge` of a recipe that names its data: the output equals `fusion_merge` on the same bench, and
every bad data field is one error line, exit 2, before any work."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from searchmerge.bench import load_bench
from searchmerge.cli import main
from searchmerge.errors import RecipeError
from searchmerge.fusion.jobs import fusion_merge
from searchmerge.recipe import Recipe, load_recipe


def _write(tmp_path, recipe: dict, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _recipe(bench, method="regmean", data=None, parameters=None, models=("t0", "t1")):
    return {"method": method, "data": {"bench": str(bench), **(data or {})},
            "models": [{"model": m} for m in models], "parameters": parameters or {}}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHMERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("method, data, parameters", [
    ("fisher", {"examples": 16, "batch_size": 4, "seed": 1}, {"normalize": False, "exclude": [".*bias"]}),
    ("regmean", {"examples": 20, "batch_size": 8}, {"alpha": 0.6}),
    ("regmean_plusplus", {"examples": 12}, {}),
    ("adamerging", {"batch_size": 8, "seed": 2}, {"granularity": "task", "steps": 3, "lr": 0.05}),
    ("adamerging", {"batch_size": 8}, {"granularity": "layer", "steps": 3, "lr": 0.05, "ties": True}),
])
def test_merge_cli_equals_fusion_merge(linear_bench_path, tmp_path, cache, method, data, parameters, capsys):
    path = _write(linear_bench_path.parent, _recipe("bench.yaml", method, data, parameters))  # relative path
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0, capsys.readouterr().err
    out = load_file(tmp_path / "out" / "model.safetensors")
    expect, _ = fusion_merge(load_bench(linear_bench_path), method, {**data, **parameters})
    assert set(out) == set(expect) and all(torch.equal(out[k], expect[k]) for k in out)
    assert load_recipe(tmp_path / "out" / "searchmerge_recipe.yaml").data.bench == str(linear_bench_path.resolve())
    if "exclude" in parameters:  # the regexes reach the method: excluded tensors keep the base
        assert torch.equal(out["net.0.bias"], load_bench(linear_bench_path).modelpool.base["net.0.bias"])
    if method == "adamerging":  # the learned coefficients, as an ordinary recipe, give the same tensors
        coef = tmp_path / "out" / "adamerging_recipe.yaml"
        assert load_recipe(coef).method == ("ties" if parameters.get("ties") else "task_arithmetic")
        assert main(["merge", str(coef), "--out", str(tmp_path / "again"), "--quiet"]) == 0
        again = load_file(tmp_path / "again" / "model.safetensors")
        assert all(torch.equal(again[k], out[k]) for k in out)


def test_subset_of_models_and_seed_override(tmp_path, cache, capsys):
    from tests.fusion.conftest import make_linear_bench

    bench = make_linear_bench(tmp_path / "pool", tasks=3)
    path = _write(tmp_path, _recipe(bench, "regmean", {"examples": 10}, models=("t2", "t0")))
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet", "--seed", "5"]) == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    full = load_bench(bench)
    sub = load_bench(bench)
    sub.taskpool = full.taskpool.subset(["t2", "t0"])
    sub.modelpool.finetuned = {t: full.modelpool.finetuned[t] for t in ("t2", "t0")}
    sub.modelpool.heads = {t: full.modelpool.heads[t] for t in ("t2", "t0")}
    expect, _ = fusion_merge(sub, "regmean", {"examples": 10, "seed": 5})
    assert all(torch.equal(out[k], expect[k]) for k in out)
    assert load_recipe(tmp_path / "out" / "searchmerge_recipe.yaml").data.seed == 5


BAD = [
    ({"data": {"bench": "nope.yaml"}}, "data.bench: bench spec", "not found"),
    ({"models": [{"model": "t9"}]}, "models[0]: `t9` is not a fine-tuned model", "t0"),
    ({"data": {"examples": 0}}, "examples must be a positive integer", "recipe.yaml:"),
    ({"data": {"examples": -3}}, "examples must be a positive integer", "recipe.yaml:"),
    ({"data": {"split": "test"}}, "never reads the report", "recipe.yaml:"),
    ({"method": "adamerging", "data": {"split": "test"}}, "report split", "allow_test"),
    ({"parameters": {"alpah": 0.5}}, "no parameter `alpah`", "did you mean `alpha`"),
    ({"parameters": {"alpha": 2.0}}, "alpha", "[0, 1]"),
    ({"parameters": {"examples": 8}}, "set it under `data:`", "recipe.yaml:"),
    ({"data": {"exampels": 8}}, "unknown key `exampels`", "did you mean `examples`"),
    ({"method": "adamerging", "data": {"examples": 8}}, "takes no `examples`", "batch_size"),
    ({"method": "ensemble"}, "evaluated, not merged", "searchmerge bench"),
    ({"method": "task_arithmetic"}, "takes no data", "remove `data:`"),
    ({"base_model": "base"}, "remove `base_model`", "recipe.yaml:"),
    ({"models": [{"model": "t0", "parameters": {"weight": 1.0}}]}, "no per-model parameters", "recipe.yaml:"),
    ({"data": None}, "learns from data", "add a `data:` block"),
    ({"seed": 3}, "move `seed` under `data:`", "recipe.yaml:"),
    ({"dtype": "float16"}, "compute in float32", "out_dtype"),
    ({"data": {"examples": "8"}}, "data.examples", "valid integer"),
]


@pytest.mark.parametrize("change, what, more", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_data_fields_one_line_exit_2_before_work(linear_bench_path, tmp_path, cache, capsys, change, what, more):
    recipe = _recipe(linear_bench_path)
    for k, v in change.items():
        if k == "data" and v is not None:
            recipe["data"] = {**recipe["data"], **v}
        elif v is None:
            del recipe[k]
        else:
            recipe[k] = v
    path = _write(tmp_path, recipe)
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("searchmerge: error: "), err
    assert what in err[0] and more in err[0], err[0]
    assert not (tmp_path / "out").exists() and not cache.exists()  # nothing written, no statistics pass


def test_data_recipe_round_trips_and_rejects_python_api_models(linear_bench_path):
    from searchmerge.merge import merge

    r = Recipe(**_recipe(linear_bench_path, data={"examples": 4}))
    assert Recipe.from_yaml(r.to_yaml()) == r and r.data.fields() == {"examples": 4}
    with pytest.raises(RecipeError, match="reads its models from its bench"):
        merge(r, base={}, models=[{}, {}])


def test_bert_task_model_folders_with_heads(tmp_path, cache, capsys):
    """On task-model folders the output is the merged base model (its config), plus each model's head."""
    from tests.bench.test_task_models import _pool

    bench, _ = _pool(tmp_path / "pool", "bert")
    path = _write(tmp_path, _recipe(bench, "regmean", {"examples": 8, "batch_size": 4}, models=("a", "b")))
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet", "--heads", "per_task"]) == 0, \
        capsys.readouterr().err
    out = load_file(tmp_path / "out" / "model.safetensors")
    expect, _ = fusion_merge(load_bench(bench), "regmean", {"examples": 8, "batch_size": 4})
    assert set(out) == set(expect) and all(torch.equal(out[k], expect[k]) for k in out)
    assert sorted(p.name for p in (tmp_path / "out" / "tasks").iterdir()) == ["a", "b"]
    from transformers import AutoModel, AutoModelForSequenceClassification

    AutoModel.from_pretrained(tmp_path / "out")
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "tasks" / "a")


def test_output_dtype_and_python_api(linear_bench_path, tmp_path, cache, capsys):
    from searchmerge.merge import merge

    path = _write(tmp_path, _recipe(linear_bench_path, "fisher", {"examples": 8}))
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet", "--dtype", "bfloat16"]) == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    state = merge(str(path))  # the Python API returns the state dict
    expect, _ = fusion_merge(load_bench(linear_bench_path), "fisher", {"examples": 8})
    assert all(torch.equal(state[k], expect[k]) and torch.equal(out[k], expect[k].to(torch.bfloat16)) for k in out)
