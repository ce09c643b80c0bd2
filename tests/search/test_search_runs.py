"""Real searches on the fixture zoo: Ray Tune with each searcher family, ASHA, multi-objective, duplicates."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from searchmerge.recipe import Recipe
from searchmerge.search import search
from searchmerge.search.report import hypervolume, pareto_front, render_report
from searchmerge.search.spec import parse_search_spec

pytestmark = pytest.mark.timeout(240)


def make_spec(zoo, **kw):
    data = {"bench": str(zoo), "methods": {"task_arithmetic": {"lambda": [0.1, 1.5]},
                                            "ties": {"density": [0.2, 0.9], "lambda": [0.2, 2.0]}},
            "budget": {"trials": 5}, "seed": 0, **kw}
    return parse_search_spec(data)


def test_optuna_search_writes_a_complete_run_folder(fixture_zoo, ray_session, tmp_path):
    out = tmp_path / "run"
    res = search(make_spec(fixture_zoo, points_to_evaluate=[{"method": "task_arithmetic", "lambda": 0.3}]), out)
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 5 and (trials.status == "done").all()
    assert set(trials.method) <= {"task_arithmetic", "ties"}
    assert trials.iloc[0]["config/method"] == "task_arithmetic" and trials.iloc[0]["config/task_arithmetic.lambda"] == 0.3
    for col in ("recipe_yaml", "average", "task_parity", "examples", "merge_s", "eval_s", "total_s", "start_time"):
        assert trials[col].notna().all(), col
    best = Recipe.from_yaml((out / "best.yaml").read_text())
    assert best.method in ("task_arithmetic", "ties")
    s = json.loads((out / "summary.json").read_text())
    assert s["best"]["search"]["average"] == pytest.approx(trials.average.max())
    assert set(s["baselines"]) == {"pretrained", "task_arithmetic_0.3", "individual"}
    assert s["baselines"]["pretrained"]["average"] < s["baselines"]["individual"]["average"]
    assert (out / "best_so_far.png").stat().st_size > 0 and (out / "best_so_far.html").stat().st_size > 0
    assert (out / "best.mergekit.yaml").exists()
    assert "best searched" in render_report(out)
    assert res.best_recipe_yaml == (out / "best.yaml").read_text()


@pytest.mark.parametrize("searcher", ["nevergrad_cma", "nevergrad_twopointsde", "optuna_cmaes", "random"])
def test_each_searcher_runs_a_few_trials(fixture_zoo, ray_session, tmp_path, searcher):
    spec = make_spec(fixture_zoo, methods={"task_arithmetic": {"lambda": [0.1, 1.5]}}, searcher=searcher,
                     budget={"trials": 3})
    search(spec, tmp_path / "run")
    trials = pd.read_parquet(tmp_path / "run" / "trials.parquet")
    assert len(trials) == 3 and (trials.status == "done").all()
    assert trials["config/task_arithmetic.lambda"].between(0.1, 1.5).all()


def test_identical_candidates_are_evaluated_once(fixture_zoo, ray_session, tmp_path):
    pt = {"method": "task_arithmetic", "lambda": 0.5}
    spec = make_spec(fixture_zoo, searcher="random", points_to_evaluate=[pt, pt], budget={"trials": 3})
    search(spec, tmp_path / "run")
    t = pd.read_parquet(tmp_path / "run" / "trials.parquet")
    assert t.duplicate.tolist()[:2] == [False, True]
    assert t.average.iloc[0] == t.average.iloc[1]


def test_asha_stops_a_deliberately_bad_candidate_early(fixture_zoo, ray_session, tmp_path):
    good = [{"method": "task_arithmetic", "lambda": v} for v in (0.3, 0.4, 0.5)]
    bad = {"method": "task_arithmetic", "lambda": 0.0}  # the pretrained backbone: far below the merges
    spec = make_spec(fixture_zoo, methods={"task_arithmetic": {"lambda": [0.0, 1.5]}}, searcher="random",
                     points_to_evaluate=good + [bad], budget={"trials": 4}, eval_batch_size=16,
                     scheduler={"type": "asha", "grace_fraction": 0.2, "reduction_factor": 2})
    search(spec, tmp_path / "run")
    t = pd.read_parquet(tmp_path / "run" / "trials.parquet")
    total = t.examples.max()
    last = t.iloc[3]
    assert last["config/task_arithmetic.lambda"] == 0.0
    assert last.status == "stopped" and last.examples < total
    assert (t.iloc[:2].examples == total).all() and (t.iloc[:2].status == "done").all()


def test_two_objective_nsga2_front_is_non_dominated(fixture_zoo, ray_session, tmp_path):
    spec = make_spec(fixture_zoo, searcher="optuna_nsga2", budget={"trials": 6},
                     objectives=[{"metric": "task:parity"}, {"metric": "task:mod3"}])
    search(spec, tmp_path / "run")
    out = tmp_path / "run"
    t = pd.read_parquet(out / "trials.parquet")
    s = json.loads((out / "summary.json").read_text())
    vals = t[["task_parity", "task_mod3"]].to_numpy()
    front = np.array([[m["search"]["task_parity"], m["search"]["task_mod3"]] for m in s["front"]])
    for p in front:  # no trial dominates a front member
        assert not any((v >= p).all() and (v > p).any() for v in vals)
    assert s["hypervolume"] == pytest.approx(hypervolume(vals[pareto_front(vals, ["max", "max"])], [0, 0], ["max", "max"]))
    assert (out / "pareto.png").exists() and (out / "pareto.html").exists() and (out / "front" / "000.yaml").exists()
    marks = s["search_split_baselines"]  # the baselines on the search split, where the plot puts them
    assert set(marks) == {"pretrained", "task_arithmetic_0.3"} and all(len(v) == 2 for v in marks.values())


def test_model_statistic_objectives_are_exact_and_on_the_front(fixture_zoo, ray_session, tmp_path):
    import torch

    from searchmerge.bench import load_bench
    from searchmerge.merge import merge

    spec = make_spec(fixture_zoo, searcher="random", budget={"trials": 4},
                     objectives=[{"metric": "average"}, {"metric": "delta_l2", "mode": "min"}],
                     reference_point=[0.0, 5.0], points_to_evaluate=[{"method": "task_arithmetic", "lambda": 0.5}])
    search(spec, tmp_path / "run")
    t = pd.read_parquet(tmp_path / "run" / "trials.parquet")
    assert t.delta_l2.notna().all() and t.delta_l0.between(0, 1).all()
    bench = load_bench(fixture_zoo)
    mp, names = bench.modelpool, bench.taskpool.names
    sd = merge(Recipe.from_yaml(t.recipe_yaml[0]), base=mp.base, models=[mp.finetuned[n] for n in names])
    norm = lambda d: float(torch.sqrt(sum(torch.sum(v.double() ** 2) for v in d.values())))  # noqa: E731
    unit = np.mean([norm({k: mp.finetuned[n][k] - mp.base[k] for k in mp.base}) for n in names])
    assert t.delta_l2[0] == pytest.approx(norm({k: sd[k] - mp.base[k] for k in mp.base}) / unit, rel=1e-5)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["front"] and all("delta_l2" in m["search"] for m in s["front"])


def test_a_failing_trial_is_recorded_and_the_search_goes_on(fixture_zoo, ray_session, tmp_path):
    # ties with trim_scope: model refuses rescale l1 at merge time: the first point fails inside its trial
    spec = make_spec(fixture_zoo, methods={"ties": {"trim_scope": "model", "rescale": ["l1", "none"],
                                                   "lambda": [0.2, 1.0]}},
                     searcher="random", budget={"trials": 4},
                     points_to_evaluate=[{"rescale": "l1", "lambda": 0.5}, {"rescale": "none", "lambda": 0.5}])
    res = search(spec, tmp_path / "run")
    t = pd.read_parquet(tmp_path / "run" / "trials.parquet")
    assert len(t) == 4
    failed = t[t.status == "failed"]
    assert len(failed) >= 1 and failed.error.str.contains("rescale").all()
    assert (t.status == "done").sum() >= 1 and res.summary["failed"] == len(failed)
    assert Recipe.from_yaml((tmp_path / "run" / "best.yaml").read_text()).parameters["rescale"] == "none"


def test_report_split_is_read_only_after_the_search(fixture_zoo, ray_session, tmp_path, monkeypatch):
    import searchmerge.search.report as report
    import searchmerge.search.run as run
    from searchmerge.search.evaluation import split_only

    reads: list[tuple[str, float]] = []
    real = run.split_features

    def logged(bench, split, tasks):
        reads.append((split, time.time()))
        return real(bench, split, tasks)

    monkeypatch.setattr(run, "split_features", logged)
    monkeypatch.setattr("searchmerge.search.evaluation.split_features", logged)
    search(make_spec(fixture_zoo, budget={"trials": 3}), tmp_path / "run")
    t = pd.read_parquet(tmp_path / "run" / "trials.parquet")
    report_reads = [ts for s, ts in reads if s == "test"]
    assert report_reads and min(report_reads) >= t.end_time.max()  # every test-split read after the last trial
    assert {s for s, _ in reads if s != "test"} == {"validation"}
    from searchmerge.bench import load_bench

    tp = split_only(load_bench(fixture_zoo).taskpool, "validation")  # what trial processes receive
    assert all(set(task.splits) == {"validation"} for task in tp.tasks.values())
    assert report is not None


def test_two_concurrent_trials_use_two_replicas_and_overlap(fixture_zoo, ray_session, tmp_path):
    spec = make_spec(fixture_zoo, methods={"task_arithmetic": {"lambda": [0.1, 1.5]}}, searcher="random",
                     budget={"trials": 6}, concurrency=2, cpus_per_replica=0.5, eval_batch_size=8)
    search(spec, tmp_path / "run")
    t = pd.read_parquet(tmp_path / "run" / "trials.parquet").sort_values("start_time")
    assert len(t) == 6 and (t.status == "done").all()
    assert set(t.replica.astype(int)) == {0, 1}  # each trial process pinned its own replica
    starts, ends = t.start_time.to_numpy(), t.end_time.to_numpy()
    assert any(starts[i + 1] < ends[i] for i in range(len(t) - 1))  # asynchronous: trials ran at the same time


def test_reservations_that_cannot_be_granted_are_refused_before_work():
    from searchmerge.search.run import check_cpus
    from searchmerge.search.spec import SearchSpecError

    spec = parse_search_spec({"bench": "fixture", "methods": {"task_arithmetic": {}}, "concurrency": 2})
    check_cpus(spec, 3.0)
    with pytest.raises(SearchSpecError, match=r"cpus_per_replica <= 0\.99"):
        check_cpus(spec, 2.0)  # two replicas at 1 CPU leave nothing for the trial processes: Tune would wait forever


def test_progress_view_shows_trials_best_and_eta(fixture_zoo, ray_session, tmp_path, capsys):
    from searchmerge.search.progress import eta_seconds

    assert eta_seconds(4, 8.0, 6, None) == pytest.approx(12.0)  # 6 trials left at 2 s each
    assert eta_seconds(4, 8.0, 6, 10.0) == pytest.approx(2.0)  # the wall budget ends first
    assert eta_seconds(0, 1.0, 6, None) is None
    search(make_spec(fixture_zoo, budget={"trials": 3}, searcher="random"), tmp_path / "run")
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert "3/3" in text and "best average" in text and "ETA" in text
