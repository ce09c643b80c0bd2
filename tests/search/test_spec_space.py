"""Search spec validation and the space read from the method registry (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from searchmerge.recipe import Recipe
from searchmerge.search.evaluation import plan_chunks
from searchmerge.search.report import hypervolume, pareto_front
from searchmerge.search.space import build_space
from searchmerge.search.spec import SearchSpecError, parse_search_spec

BASE = {"bench": "fixture", "methods": {"task_arithmetic": {"lambda": "search"}}}


def spec(**kw):
    return parse_search_spec({**BASE, **kw})


@pytest.mark.parametrize("update, needle", [
    ({"search_split": "test", "report_split": "test"}, "must differ"),
    ({"search_split": "test", "report_split": "validation"}, "allow_search_on_test"),
    ({"methods": {"tiez": {}}}, "unknown merge method"),
    ({"methods": {"ties": {"lamda": 0.3}}}, "no parameter(s) ['lamda']"),
    ({"methods": {"ties": {"density": [0.5, 1.5]}}}, "leaves the declared range"),
    ({"methods": {"ties": {"density": [0.9, 0.1]}}}, "must be below"),
    ({"methods": {"ties": {"merge_func": ["sum", "median"]}}}, "sub-list"),
    ({"methods": {"ties": {"density": 7}}}, "density"),
    ({"searcher": "optuna_magic"}, "searcher"),
    ({"objectives": [{"metric": "average"}, {"metric": "worst"}], "searcher": "optuna_cmaes"}, "single-objective"),
    ({"objectives": [{"metric": "f1ish"}]}, "objective metric"),
    ({"budget": {"trials": 0}}, "budget.trials"),
    ({"wat": 1}, "wat"),
    ({"points_to_evaluate": [{"method": "ties"}]}, "not among the searched methods"),
    ({"points_to_evaluate": [{"lamda": 0.3}]}, "points_to_evaluate[0]"),
])
def test_spec_errors_name_the_field(update, needle):
    with pytest.raises(SearchSpecError) as exc:
        spec(**update)
    assert needle in str(exc.value)


def test_search_on_test_can_be_forced():
    s = spec(search_split="test", report_split="validation", allow_search_on_test=True)
    assert s.search_split == "test"


def test_method_categorical_samples_every_method_with_conditional_parameters():
    s = spec(methods={"task_arithmetic": {"lambda": [0.1, 1.0]},
                      "ties": {"density": [0.1, 0.9], "lambda": "search", "merge_func": ["sum", "mean"]},
                      "tsv_m": {"lambda": "search"}})
    space = build_space(s, ["a", "b", "c"])
    assert space.methods == ("task_arithmetic", "ties", "tsv_m")
    seen = set()
    rng = np.random.default_rng(0)
    dom = space.tune_space()
    for _ in range(60):
        cfg = {k: v.sample(random_state=rng) for k, v in dom.items()}
        r = space.to_recipe(cfg)
        assert isinstance(r, Recipe)
        seen.add(r.method)
        # only the drawn method's parameters reach the recipe
        drawn = {k.split(".", 1)[1]: v for k, v in cfg.items() if k.startswith(r.method + ".")}
        assert dict(r.parameters) == drawn
        if r.method == "ties":
            assert 0.1 <= r.parameters["density"] <= 0.9 and r.parameters["merge_func"] in ("sum", "mean")
    assert seen == {"task_arithmetic", "ties", "tsv_m"}


def test_per_model_and_layer_groups_become_depth_gradients():
    s = spec(methods={"ties": {"density": [0.2, 0.8], "weight": [0.0, 1.0], "lambda": 1.0}},
             granularity="per_model", layer_groups=3)
    space = build_space(s, ["a", "b"])
    keys = [d.key for d in space.dims]
    assert len(keys) == 2 * 2 * 3 and "ties.density@a#0" in keys
    cfg = {d.key: (0.5 if d.param == "density" else 0.25) + 0.1 * (d.group or 0) for d in space.dims}
    r = space.to_recipe(cfg)
    assert r.parameters == {"lambda": 1.0}
    assert r.models[0].parameters["density"] == pytest.approx([0.5, 0.6, 0.7])
    assert r.models[1].parameters["weight"] == pytest.approx([0.25, 0.35, 0.45])


def test_layer_groups_give_a_searched_global_scalar_a_depth_gradient():
    s = spec(methods={"tsv_m": {"lambda": [0.2, 2.0]}}, layer_groups=3,
             points_to_evaluate=[{"method": "tsv_m", "lambda": 1.0}])
    space = build_space(s, ["a", "b"])
    assert [d.key for d in space.dims] == ["tsv_m.lambda#0", "tsv_m.lambda#1", "tsv_m.lambda#2"]
    r = space.to_recipe({"tsv_m.lambda#0": 0.5, "tsv_m.lambda#1": 1.0, "tsv_m.lambda#2": 1.5})
    assert r.parameters["lambda"] == [0.5, 1.0, 1.5] and all(not m.parameters.get("lambda") for m in r.models)
    assert space.to_recipe(space.point(s.points_to_evaluate[0])).parameters["lambda"] == [1.0, 1.0, 1.0]


def test_points_fill_unset_coordinates_inside_the_range():
    s = spec(methods={"task_arithmetic": {"lambda": [0.1, 1.0]}, "ties": {"density": [0.1, 0.5]}},
             points_to_evaluate=[{"method": "task_arithmetic", "lambda": 0.3}])
    space = build_space(s, ["a", "b"])
    p = space.point(s.points_to_evaluate[0])
    assert p["method"] == "task_arithmetic" and p["task_arithmetic.lambda"] == 0.3
    assert 0.1 <= p["ties.density"] <= 0.5  # declared default 1.0 lies outside: the midpoint
    assert space.to_recipe(p).parameters == {"lambda": 0.3}


def test_chunks_interleave_tasks_and_are_reproducible():
    sizes = {"a": 100, "b": 50, "c": 30}
    c1, c2 = plan_chunks(sizes, 10, seed=3), plan_chunks(sizes, 10, seed=3)
    assert [(t, i.tolist()) for t, i in c1] == [(t, i.tolist()) for t, i in c2]
    for t, n in sizes.items():  # every example exactly once
        idx = np.concatenate([i for tt, i in c1 if tt == t])
        assert sorted(idx.tolist()) == list(range(n))
    first = [t for t, _ in c1[:6]]
    assert set(first) == {"a", "b", "c"}  # not task by task
    assert [t for t, _ in plan_chunks(sizes, 10, seed=4)] != [t for t, _ in c1]


def test_hypervolume_matches_a_hand_computed_2d_case():
    pts = np.array([[0.2, 0.8], [0.5, 0.5], [0.8, 0.2], [0.4, 0.4]])  # the last is dominated
    front = pareto_front(pts, ["max", "max"])
    assert front.tolist() == [0, 1, 2]
    # staircase above the (0, 0) reference: 0.2*0.8 + (0.5-0.2)*0.5 + (0.8-0.5)*0.2
    assert hypervolume(pts[front], [0.0, 0.0], ["max", "max"]) == pytest.approx(0.16 + 0.15 + 0.06)
    assert hypervolume(pts, [0.0, 0.0], ["max", "max"]) == pytest.approx(0.37)


def test_out_folder_rules(tmp_path):
    from searchmerge.search.run import _check_out

    _check_out(tmp_path / "new" / "deeper" / "run", resume=False, force=False)  # parents are created
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SearchSpecError, match="--force"):
        _check_out(tmp_path / "full", resume=False, force=False)
    with pytest.raises(SearchSpecError, match="no search to resume"):
        _check_out(tmp_path / "full", resume=True, force=False)


BERT_NAMES = {
    "embeddings.word_embeddings.weight": "embedding", "embeddings.LayerNorm.weight": "norm",
    "encoder.layer.0.attention.self.query.weight": "attention", "encoder.layer.0.attention.output.dense.weight": "attention",
    "encoder.layer.0.attention.output.LayerNorm.bias": "norm", "encoder.layer.0.intermediate.dense.weight": "mlp",
    "encoder.layer.0.output.dense.weight": "mlp", "encoder.layer.0.output.LayerNorm.weight": "norm",
    "pooler.dense.weight": "other", "model.layers.3.self_attn.q_proj.weight": "attention",
    "model.layers.3.mlp.up_proj.weight": "mlp", "model.layers.3.input_layernorm.weight": "norm",
    "transformer.h.0.ln_1.weight": "norm", "transformer.wte.weight": "embedding",
}


def test_tensor_kinds_classify_common_architectures():
    from searchmerge.search.space import tensor_kind

    assert {n: tensor_kind(n) for n in BERT_NAMES} == BERT_NAMES


@pytest.mark.parametrize("granularity", ["global", "per_model"])
def test_tensor_kinds_emit_filters_that_resolve_per_kind(granularity):
    from searchmerge.recipe import layer_fraction, resolve_params

    s = spec(methods={"ties": {"density": [0.1, 0.9], "lambda": [0.2, 2.0]}}, granularity=granularity,
             tensor_kinds=["attention", "mlp"])
    space = build_space(s, ["a", "b"])
    kinds = {d.kind for d in space.dims}
    assert kinds == {"attention", "mlp", "other"}
    per = 2 if granularity == "per_model" else 1
    assert len(space.dims) == 3 + 3 * per  # lambda (global) + density (per model when asked), x 3 kinds
    config = {d.key: {"attention": 0.3, "mlp": 0.6, "other": 0.8}[d.kind] + (0.01 * (d.model or 0)) for d in space.dims}
    recipe = Recipe.from_yaml(space.to_recipe(config).to_yaml())  # a valid recipe, round-trips
    for name, kind in BERT_NAMES.items():
        p = resolve_params(recipe, name, layer_fraction(name, 6))
        want = {"attention": 0.3, "mlp": 0.6}.get(kind, 0.8)
        assert p["lambda"] == pytest.approx(want)
        dens = p["density"]  # a per-model parameter: one value per model either way
        assert dens == pytest.approx([want, want + 0.01] if granularity == "per_model" else [want, want])


def test_tensor_kinds_listed_twice_refused():
    with pytest.raises(SearchSpecError, match="tensor_kinds"):
        spec(tensor_kinds=["mlp", "mlp"])


def test_length_bucketed_chunks_pad_little_cover_everything_and_stay_shuffled():
    rng = np.random.default_rng(0)
    sizes = {"a": 200, "b": 90}
    lengths = {t: rng.integers(3, 64, n) for t, n in sizes.items()}
    c1 = plan_chunks(sizes, 16, seed=5, lengths=lengths)
    assert [(t, i.tolist()) for t, i in c1] == [(t, i.tolist()) for t, i in plan_chunks(sizes, 16, seed=5, lengths=lengths)]
    for t, n in sizes.items():
        assert sorted(np.concatenate([i for tt, i in c1 if tt == t]).tolist()) == list(range(n))
    padded = sum(len(i) * lengths[t][i].max() for t, i in c1)
    random_padded = sum(len(i) * lengths[t][i].max() for t, i in plan_chunks(sizes, 16, seed=5))
    real = sum(int(v.sum()) for v in lengths.values())
    assert padded < 1.3 * real < random_padded  # a batch pads to about its own length
    maxima = [int(lengths[t][i].max()) for t, i in c1 if t == "a"]
    assert maxima != sorted(maxima)  # strata visited in a shuffled order: no prefix holds only short texts
    assert {t for t, _ in c1[:4]} == {"a", "b"}


def test_partial_results_of_bucketed_chunks_add_up_to_the_final_one():
    from types import SimpleNamespace as NS

    from searchmerge.search.evaluation import new_scorer

    rng = np.random.default_rng(1)
    labels = {"a": rng.integers(0, 3, 50), "b": rng.integers(0, 2, 30)}
    preds = {t: np.where(rng.random(len(v)) < 0.7, v, (v + 1) % 3) for t, v in labels.items()}
    lengths = {t: rng.integers(1, 40, len(v)) for t, v in labels.items()}
    chunks = plan_chunks({t: len(v) for t, v in labels.items()}, 8, seed=2, lengths=lengths)
    class Split(NS):  # the scorer reads a split's length and labels, and the task's metric
        def __len__(self):
            return len(self.labels)

    tp = NS(tasks={t: NS(spec=NS(metric="accuracy"), splits={"validation": Split(labels=v)}) for t, v in labels.items()})
    scorer = new_scorer(tp, "validation", ["a", "b"])
    seen = 0
    for t, idx in chunks:
        scorer.add(t, idx, preds[t][idx])
        seen += len(idx)
        assert scorer.report()["n"] == seen
    final = scorer.report(final=True)
    for t in labels:
        assert final["per_task"][t] == pytest.approx(float(np.mean(preds[t] == labels[t])))


def test_searchmerge_search_is_callable_and_its_submodules_import():
    import searchmerge
    import searchmerge.search.report as report  # a submodule import through the package name still works
    from searchmerge.search import search

    assert callable(searchmerge.search) and callable(search) and report.render_report
