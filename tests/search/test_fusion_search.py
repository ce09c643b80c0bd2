"""Data-driven fusion methods in a search: their parameters searched (checked before any work), their trials
equal to the fusion job at the same parameters, statistics computed once across trials, fixed recipes as one
trial, and AdaMerging's coefficients as a CMA-ES search's first candidate."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from searchmerge.search import search
from searchmerge.recipe import Recipe
from searchmerge.search.fusion import fusion_recipe
from searchmerge.search.space import build_space
from searchmerge.search.spec import SearchSpecError, parse_search_spec

pytestmark = pytest.mark.timeout(300)


def spec(bench="fixture", **kw):
    return parse_search_spec({"bench": str(bench), "seed": 0, **kw})


@pytest.mark.parametrize("methods, needle", [
    ({"regmean": {"alpah": 0.5}}, "methods.regmean: no parameter(s) ['alpah'] — did you mean `alpha`?"),
    ({"regmean": {"alpha": 1.5}}, "methods.regmean.alpha: `alpha` must lie in [0, 1], got 1.5."),
    ({"regmean": {"alpha": [0.5, 1.5]}}, "methods.regmean.alpha: range [0.5, 1.5] leaves the declared range [0, 1]"),
    ({"regmean_plusplus": {"alpha": -0.1}}, "must lie in [0, 1]"),
    ({"fisher": {"examples": 0}}, "methods.fisher.examples: `examples` must lie in [1, inf), got 0."),
    ({"fisher": {"examples": [64, -1]}}, "methods.fisher.examples"),
    ({"fisher": {"examples": 2.5}}, "must be an integer"),
    ({"regmean": {"split": "test"}}, "methods.regmean.split: `split` must be one of ['train', 'validation']"),
    ({"fisher": {"normalize": [True, "maybe"]}}, "methods.fisher.normalize"),
    ({"fisher": {"epsilon": 0}}, "methods.fisher.epsilon"),
    ({"fisher": {"exclude": ["(unclosed"]}}, "methods.fisher.exclude"),
    ({"adamerging": {"allow_test": True}}, "methods.adamerging: no parameter(s) ['allow_test']"),
    ({"ensemble": {"mode": "simple"}}, "ensembles are evaluated, not merged"),
])
def test_bad_fusion_fields_are_one_line_errors_naming_the_field(methods, needle):
    with pytest.raises(SearchSpecError) as exc:
        spec(methods=methods)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_statistics_split_must_not_be_the_report_split():
    with pytest.raises(SearchSpecError, match=r"methods.regmean.split: `validation` is the report split"):
        spec(methods={"regmean": {"split": ["train", "validation"]}}, search_split="train", report_split="validation")


def test_bad_fusion_fields_are_refused_before_ray_starts(tmp_path, monkeypatch):
    import ray

    def no_ray(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("Ray was started for a spec that should have been refused")

    monkeypatch.setattr(ray, "init", no_ray)
    path = tmp_path / "bad.yaml"
    path.write_text("bench: fixture\nmethods:\n  regmean: {alpha: [0.2, 1.4], examples: 64}\n")
    with pytest.raises(SearchSpecError, match=r"bad.yaml.*methods.regmean.alpha"):
        search(path, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_fusion_space_is_one_syntax_discrete_statistics_and_whole_model_scalars():
    s = spec(methods={"fisher": {"examples": [64, 128, 256], "normalize": [True, False], "epsilon": 1e-6},
                      "regmean": {"alpha": [0.5, 1.0]}, "task_arithmetic": {"lambda": [0.1, 1.0]}},
             layer_groups=2)
    space = build_space(s, ["a", "b"])
    dims = {d.key: d for d in space.dims}
    assert dims["fisher.examples"].choices == (64, 128, 256)  # a list of counts, never a range
    assert dims["fisher.normalize"].choices == (True, False)
    assert (dims["regmean.alpha"].low, dims["regmean.alpha"].high) == (0.5, 1.0)
    assert "regmean.alpha#0" not in dims and "task_arithmetic.lambda#1" in dims  # no depth gradient for α
    r = space.to_recipe({"method": "regmean", "regmean.alpha": 0.7, "fisher.examples": 64})
    assert r.method == "regmean" and r.data.bench == "fixture" and [m.model for m in r.models] == ["a", "b"]
    assert r.parameters["alpha"] == 0.7 and r.data.examples == 256  # fusion.jobs' default, filled in
    assert Recipe.from_yaml(r.to_yaml()) == r
    f = space.to_recipe(space.point({"method": "fisher", "examples": 128, "normalize": False}))
    assert (f.data.examples, f.parameters["normalize"], f.parameters["epsilon"]) == (128, False, 1e-6)


def _bench(zoo):
    from searchmerge.bench import load_bench

    return load_bench(zoo)


def test_searched_regmean_alpha_trials_equal_the_fusion_job_and_statistics_run_once(
        fixture_zoo, ray_session, tmp_path, monkeypatch):
    from searchmerge.fusion.jobs import run_fusion

    monkeypatch.setenv("SEARCHMERGE_CACHE", str(tmp_path / "cache"))  # a fresh statistics cache
    alphas = [0.3, 0.9, 0.6]
    points = [{"method": "regmean", "alpha": alphas[0]}, {"method": "task_arithmetic", "lambda": 0.3},
              {"method": "regmean", "alpha": alphas[1]}, {"method": "regmean", "alpha": alphas[2]}]
    s = spec(fixture_zoo, methods={"regmean": {"alpha": [0.0, 1.0], "examples": 64},
                                   "task_arithmetic": {"lambda": [0.1, 1.0]}},
             searcher="random", budget={"trials": 4}, points_to_evaluate=points)
    out = tmp_path / "run"
    search(s, out, progress=False)
    t = pd.read_parquet(out / "trials.parquet")
    assert len(t) == 4 and (t.status == "done").all()
    assert t.method.tolist() == ["regmean", "task_arithmetic", "regmean", "regmean"]
    rm = t[t.method == "regmean"].reset_index(drop=True)
    assert rm["config/regmean.alpha"].tolist() == alphas
    # one statistics pass (5 Gram sets, one per model) across the three RegMean trials: later ones read the cache
    assert rm.stats_computed.tolist() == [5, 0, 0] and rm.stats_hits.tolist() == [0, 5, 5]
    assert t[t.method == "task_arithmetic"].stats_computed.isna().all()
    bench = _bench(fixture_zoo)
    for a, row in zip(alphas, rm.itertuples()):
        job = run_fusion(bench, "regmean", {"alpha": a, "examples": 64}, ["validation"])["results"]["validation"]
        assert row.average == pytest.approx(job["average"], abs=1e-12)
        for task, acc in job["per_task"].items():
            assert getattr(row, f"task_{task}") == pytest.approx(acc, abs=1e-12)
        want = fusion_recipe("regmean", {"alpha": a, "examples": 64}, str(fixture_zoo.resolve()), bench.taskpool.names)
        assert Recipe.from_yaml(row.recipe_yaml) == want
    # a trial's recipe is a data recipe: what `searchmerge merge` runs gives the trial's merge, bit for bit
    import torch

    from searchmerge.fusion.data_recipe import data_bench, run_data_recipe
    from searchmerge.fusion.jobs import fusion_merge

    r0 = Recipe.from_yaml(rm.recipe_yaml[0])
    merged, _ = run_data_recipe(r0, data_bench(r0))
    ref, _ = fusion_merge(bench, "regmean", {"alpha": alphas[0], "examples": 64})
    assert merged.keys() == ref.keys() and all(torch.equal(merged[k], ref[k]) for k in ref)
    summary = json.loads((out / "summary.json").read_text())
    best = Recipe.from_yaml((out / "best.yaml").read_text())
    if best.data is not None:  # the report split re-evaluates the fusion job itself
        from searchmerge.fusion.data_recipe import data_params

        test = run_fusion(bench, "regmean", data_params(best), ["test"])["results"]["test"]
        assert summary["best"]["report"]["average"] == pytest.approx(test["average"], abs=1e-12)
        assert "not expressible in MergeKit" in (out / "best.mergekit.txt").read_text()


def test_a_fixed_fusion_recipe_is_one_trial(fixture_zoo, ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHMERGE_CACHE", str(tmp_path / "cache"))
    s = spec(fixture_zoo, methods={"fisher": {"examples": 32, "normalize": False}}, searcher="optuna_tpe",
             budget={"trials": 6})
    res = search(s, tmp_path / "run", progress=False)
    t = pd.read_parquet(tmp_path / "run" / "trials.parquet")
    assert len(t) == 1 and t.status.tolist() == ["done"] and t.method.tolist() == ["fisher"]
    assert t.stats_computed.tolist() == [5]
    assert res.summary["best"]["search"]["average"] == pytest.approx(t.average[0])


def test_adamerging_search_point_is_the_first_cmaes_trial(fixture_zoo, ray_session, tmp_path):
    from searchmerge.fusion.adamerging import AdaMergingConfig, adamerge, search_point
    from searchmerge.recipe import Recipe

    bench = _bench(fixture_zoo)
    names = bench.taskpool.names
    res = adamerge(bench, AdaMergingConfig(granularity="task", steps=3, lr=5e-3))
    pt = search_point(res, names)
    s = spec(fixture_zoo, methods={"task_arithmetic": {"weight": [0.0, 1.0], "lambda": 1.0}},
             granularity="per_model", searcher="optuna_cmaes", budget={"trials": 2}, points_to_evaluate=[pt])
    search(s, tmp_path / "run", progress=False)
    t = pd.read_parquet(tmp_path / "run" / "trials.parquet")
    first = t.iloc[0]
    assert len(t) == 2 and first.status == "done"
    for n in names:
        want = min(max(pt["weight"][n], 0.0), 1.0)
        assert first[f"config/task_arithmetic.weight@{n}"] == pytest.approx(want, abs=1e-12)
    recipe = Recipe.from_yaml(first.recipe_yaml)
    assert [m.parameters["weight"] for m in recipe.models] == pytest.approx([min(max(pt["weight"][n], 0), 1) for n in names])


def test_a_store_actor_restart_mid_fusion_trial_remerges_the_same_model(fixture_zoo, ray_session, tmp_path, monkeypatch):
    """θ₀ is merged through the store before the data-driven merge is loaded, so the evaluator's incarnation is
    recorded: a restart after the load is detected (never a silent read of the rebuilt θ₀) and the trial merges
    again — the statistics from the cache — with the same final metrics."""
    import functools
    import time

    import ray

    from searchmerge.fusion.jobs import run_fusion
    from searchmerge.search.driver import evaluate_resident
    from searchmerge.search.evaluation import (
        build_eval_module, exact_model, new_scorer, plan_chunks, split_features, token_lengths,
    )
    from searchmerge.search.fusion import FusionSource
    from searchmerge.store import TaskVectorStore

    monkeypatch.setenv("SEARCHMERGE_CACHE", str(tmp_path / "cache"))
    bench = _bench(fixture_zoo)
    tasks = bench.taskpool.names
    mp = bench.modelpool
    source = FusionSource.put(bench, "test")
    recipe = fusion_recipe("regmean", {"alpha": 0.5, "examples": 32}, str(fixture_zoo), tasks)
    feats = split_features(bench, "validation", tasks)
    sizes = {t: len(bench.taskpool.tasks[t].splits["validation"]) for t in tasks}
    chunks = plan_chunks(sizes, 16, 0, token_lengths(feats))
    with TaskVectorStore.build(mp.base, [mp.finetuned[t] for t in tasks], names=tasks, cpus_per_actor=0.1) as store:
        ev = store.attach_evaluator(functools.partial(build_eval_module, exact_model(bench), 1))
        run = lambda on_chunk=None: evaluate_resident(store, ev, recipe, feats, chunks,  # noqa: E731
                                                      new_scorer(bench.taskpool, "validation", tasks), on_chunk,
                                                      fusion=source)
        calm = run()
        killed = []

        def kill_once(partial, merge_s, eval_s, info):  # noqa: ANN001, ANN202
            if not killed:
                killed.append(True)
                ray.kill(store._actors[0], no_restart=False)
                time.sleep(0.5)  # ray.kill is asynchronous

        hit = run(kill_once)
    assert calm["fusion"]["stats_computed"] == 5 and hit["fusion"]["stats_hits"] == 5
    assert hit["store_retries"] == 1 and hit["result"]["average"] == calm["result"]["average"]
    job = run_fusion(bench, "regmean", {"alpha": 0.5, "examples": 32}, ["validation"])["results"]["validation"]
    assert calm["result"]["average"] == pytest.approx(job["average"], abs=1e-12)
