"""How good a recipe does a search find, how fast, on the default (text) zoo — searchers, schedulers, throughput.

    python benchmarks/bench_search.py                         # every part, 50 trials x 2 seeds
    python benchmarks/bench_search.py --trials 50 100 200 --seeds 0 1 --parts searchers
    python benchmarks/bench_search.py --bench fixture --trials 4 8 --seeds 0 --quick   # a smoke run

Parts (each a real ``searchmerge.search.search`` on the zoo, one Ray in one process; results land in
``OUT/results.json`` as each part ends, so an interrupted run keeps what finished):

* ``searchers``: random search and three searchers — TPE and TwoPointsDE over the *method categorical*
  (task arithmetic | TIES | DARE-TIES | TSV-M | ISO-C with their parameters) and CMA-ES over *per-layer* TIES
  weights (one weight per task and layer group) — each run for max(--trials) trials per seed with ASHA.
  For every checkpoint N in --trials, the best recipe on the search split among the first N finished
  trials (the best-so-far curve) is re-evaluated on the **test** split, beside pretrained, TA λ=0.3,
  TIES, TSV-M and individual, with the share of the TA(λ=0.3)→individual gap it closes.
* ``asha``: TPE with ASHA against TPE with FIFO at the same trial budget: examples evaluated, wall time,
  best validation and test.
* ``throughput``: trials per minute at concurrency 1 and 2 (FIFO, random search over task arithmetic, the
  same candidates) and the Tune overhead per trial: trial wall time minus merge and evaluation, as a
  fraction of the trial.
* ``nsga2``: NSGA-II against random search on two objectives (average accuracy ↑, ‖θ−θ₀‖ ↓) at the same
  budget: the hypervolume of each front against the same reference point (moocore).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

CATEGORICAL = {  # the method is searched, each with its own parameters (as experiments/search-text.yaml)
    "task_arithmetic": {"lambda": [0.1, 1.5]},
    "ties": {"density": [0.05, 0.9], "lambda": [0.2, 2.0], "merge_func": ["sum", "mean"]},
    "dare_ties": {"density": [0.1, 0.9], "lambda": [0.2, 2.0]},
    "tsv_m": {"lambda": [0.2, 2.0]},
    "iso_c": {"lambda": [0.3, 2.0]},
}
PER_LAYER = {"ties": {"weight": [0.0, 1.5], "density": 0.2, "lambda": [0.2, 2.0], "merge_func": "sum"}}
SEEDS_POINTS = [{"method": "task_arithmetic", "lambda": 0.3}, {"method": "tsv_m", "lambda": 1.0}]
FIXED = {  # the leaderboard's fixed recipes (docs/leaderboard.md), evaluated here on the test split
    "ties": {"method": "ties", "parameters": {"density": 0.2, "lambda": 0.3, "merge_func": "sum", "trim_scope": "model"}},
    "tsv_m": {"method": "tsv_m", "parameters": {"lambda": 1.0}},
}


def searcher_configs(quick: bool) -> dict[str, dict[str, Any]]:
    asha = {"type": "asha", "grace_fraction": 0.25, "reduction_factor": 3}
    cat = {"methods": CATEGORICAL, "points_to_evaluate": SEEDS_POINTS, "scheduler": asha}
    out = {
        "random (categorical)": {**cat, "searcher": "random", "points_to_evaluate": []},
        "optuna_tpe (categorical)": {**cat, "searcher": "optuna_tpe"},
        "nevergrad_twopointsde (categorical)": {**cat, "searcher": "nevergrad_twopointsde"},
        "nevergrad_cma (per-layer TIES, 6 tasks x 3 groups)": {
            "methods": PER_LAYER, "granularity": "per_model", "layer_groups": 3, "searcher": "nevergrad_cma",
            "scheduler": asha,
            "points_to_evaluate": [{"method": "ties", "weight": 1.0, "lambda": 0.3}],
        },
    }
    if quick:
        out = dict(list(out.items())[:2])
    return out


class TestScorer:
    """Recipes re-evaluated on the test split on one resident store (cached by recipe text)."""

    def __init__(self, bench_path: Path) -> None:
        import functools

        from searchmerge.bench import load_bench
        from searchmerge.search.evaluation import build_eval_module, exact_model
        from searchmerge.store import TaskVectorStore

        self.bench = load_bench(bench_path)
        self.tasks = self.bench.taskpool.names
        mp = self.bench.modelpool
        self.store = TaskVectorStore.build(mp.base, [mp.finetuned[t] for t in self.tasks], names=self.tasks,
                                           cpus_per_actor=0.01, cache_fraction=0.5)
        self.ev = self.store.attach_evaluator(functools.partial(build_eval_module, exact_model(self.bench), 1))
        from searchmerge.search.spec import parse_search_spec

        self.spec = parse_search_spec({"bench": str(bench_path), "methods": {"task_arithmetic": {}}})
        self.seen: dict[str, float] = {}

    def __call__(self, recipe_yaml: str) -> float:
        from searchmerge.recipe import Recipe
        from searchmerge.search.report import _report_eval

        if recipe_yaml not in self.seen:
            res = _report_eval(self.spec, self.bench, [(self.store, self.ev)], Recipe.from_yaml(recipe_yaml), self.tasks)
            self.seen[recipe_yaml] = float(res["average"])
        return self.seen[recipe_yaml]

    def fixed(self, name: str) -> float:
        from searchmerge.recipe import Recipe

        r = Recipe(base_model="base", models=[{"model": t} for t in self.tasks], **FIXED[name])
        return self(r.to_yaml())


def best_so_far_at(trials: pd.DataFrame, n: int, key: str = "average") -> pd.Series | None:
    """The best complete trial (search split) among the first ``n`` to finish."""
    first = trials.sort_values("finished_at").head(n)
    done = first[(first.status == "done") & first[key].notna()]
    return None if done.empty else done.loc[done[key].idxmax()]


def run_search(bench: str, out: Path, name: str, **spec: Any) -> tuple[pd.DataFrame, dict[str, Any], float]:
    from searchmerge.search import search
    from searchmerge.search.spec import parse_search_spec

    t0 = time.perf_counter()
    res = search(parse_search_spec({"bench": bench, "name": name, **spec}), out, force=True, progress=False)
    return res.trials, res.summary, time.perf_counter() - t0


def gap(v: float, ta: float, ind: float) -> float:
    return (v - ta) / (ind - ta) if ind != ta else float("nan")


def part_searchers(args: argparse.Namespace, scorer: TestScorer, results: dict[str, Any]) -> None:
    n_max = max(args.trials)
    rows = []
    for label, cfg in searcher_configs(args.quick).items():
        for seed in args.seeds:
            slug = label.split(" ")[0] + f"-s{seed}"
            trials, summary, wall = run_search(args.bench, args.out / slug, slug, budget={"trials": n_max}, seed=seed, **cfg)
            base = summary["baselines"]
            ta, ind = base["task_arithmetic_0.3"]["average"], base["individual"]["average"]
            row = {"searcher": label, "seed": seed, "wall_s": wall, "trials": len(trials),
                   "stopped_early": int((trials.status == "stopped").sum()), "failed": int((trials.status == "failed").sum())}
            for n in args.trials:
                best = best_so_far_at(trials, n)
                row[f"val@{n}"] = None if best is None else float(best["average"])
                row[f"test@{n}"] = None if best is None else scorer(best["recipe_yaml"])
                row[f"gap@{n}"] = None if best is None else gap(row[f"test@{n}"], ta, ind)
                row[f"method@{n}"] = None if best is None else best["method"]
            rows.append(row)
            results["baselines"] = {"pretrained": base["pretrained"]["average"], "task_arithmetic_0.3": ta,
                                    "ties": scorer.fixed("ties"), "tsv_m": scorer.fixed("tsv_m"), "individual": ind}
            results["searchers"] = rows
            save(args.out, results)
            print(json.dumps(row), flush=True)


def part_asha(args: argparse.Namespace, scorer: TestScorer, results: dict[str, Any]) -> None:
    n = min(max(args.trials), 25)
    cfg = searcher_configs(args.quick)["optuna_tpe (categorical)"]
    rows = []
    for sched in ({"type": "asha", "grace_fraction": 0.25, "reduction_factor": 3}, {"type": "fifo"}):
        slug = f"asha-{sched['type']}"
        trials, summary, wall = run_search(args.bench, args.out / slug, slug, budget={"trials": n}, seed=args.seeds[0],
                                           **{**cfg, "scheduler": sched})
        best = best_so_far_at(trials, n)
        rows.append({"scheduler": sched["type"], "trials": len(trials), "wall_s": wall,
                     "examples_evaluated": summary["examples_evaluated"],
                     "stopped_early": int((trials.status == "stopped").sum()),
                     "best_val": float(best["average"]), "best_test": scorer(best["recipe_yaml"]), "best_method": best["method"]})
        results["asha"] = rows
        save(args.out, results)
        print(json.dumps(rows[-1]), flush=True)


def part_throughput(args: argparse.Namespace, scorer: TestScorer, results: dict[str, Any]) -> None:
    n = 6 if args.quick else 12
    rows = []
    for k in (1, 2):
        slug = f"throughput-c{k}"
        trials, summary, wall = run_search(args.bench, args.out / slug, slug, budget={"trials": n}, seed=3, concurrency=k,
                                           cpus_per_replica=0.9, methods={"task_arithmetic": {"lambda": [0.1, 1.0]}},
                                           searcher="random", scheduler={"type": "fifo"})
        t = trials[trials.status == "done"]
        span = float(t.finished_at.max() - t.start_time.min())
        # Tune's cost per trial: inside the trial (its wall time minus merge and evaluation: reports, the duplicate
        # lookup, the replica pin) plus the driver's gap before the next trial on the same replica (the searcher's
        # suggestion, scheduling, the reused trial process's reset)
        inside = (t.total_s - t.merge_s - t.eval_s).clip(lower=0)
        gaps = []
        for _, g in t.sort_values("start_time").groupby("replica" if "replica" in t else "method"):
            gaps += (g.start_time.to_numpy()[1:] - g.end_time.to_numpy()[:-1]).tolist()
        between = float(np.median(gaps)) if gaps else 0.0
        overhead = inside + between
        rows.append({"concurrency": k, "trials": len(t), "search_span_s": span, "trials_per_min": 60 * len(t) / span,
                     "merge_s": float(t.merge_s.median()), "eval_s": float(t.eval_s.median()),
                     "in_trial_overhead_s": float(inside.median()), "between_trials_s": between,
                     "tune_overhead_fraction": float((overhead / (t.total_s + between)).median()),
                     "replicas_used": int(t.replica.nunique()) if "replica" in t else 1})
        results["throughput"] = rows
        save(args.out, results)
        print(json.dumps(rows[-1]), flush=True)


def part_nsga2(args: argparse.Namespace, scorer: TestScorer, results: dict[str, Any]) -> None:
    from searchmerge.search.report import hypervolume, pareto_front

    n = 8 if args.quick else 16
    objectives = [{"metric": "average", "mode": "max"}, {"metric": "delta_l2", "mode": "min"}]
    ref = [0.0, 2.0]
    rows = []
    for searcher in ("optuna_nsga2", "random"):
        slug = f"mo-{searcher}"
        trials, summary, wall = run_search(args.bench, args.out / slug, slug, budget={"trials": n}, seed=args.seeds[0],
                                           methods=CATEGORICAL, searcher=searcher, objectives=objectives, reference_point=ref)
        d = trials[trials.status == "done"]
        vals = d[["average", "delta_l2"]].to_numpy(float)
        front = pareto_front(vals, ["max", "min"])
        rows.append({"searcher": searcher, "trials": len(trials), "wall_s": wall, "front_size": int(len(front)),
                     "hypervolume": hypervolume(vals[front], ref, ["max", "min"]), "reference_point": ref})
        results["nsga2"] = rows
        save(args.out, results)
        print(json.dumps(rows[-1]), flush=True)


PARTS = {"searchers": part_searchers, "asha": part_asha, "throughput": part_throughput, "nsga2": part_nsga2}


def save(out: Path, results: dict[str, Any]) -> None:
    from searchmerge.io.writer import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=float))


def tables(results: dict[str, Any], checkpoints: list[int]) -> str:
    """Markdown tables for the README (test averages in %, gap closure in %)."""
    lines = []
    b = results.get("baselines")
    if b:
        lines += ["| baseline | " + " | ".join(b) + " |", "|---" * (len(b) + 1) + "|",
                  "| test avg | " + " | ".join(f"{100 * v:.1f}" for v in b.values()) + " |", ""]
    if results.get("searchers"):
        df = pd.DataFrame(results["searchers"])
        head = "| searcher | " + " | ".join(f"test @{n} (gap)" for n in checkpoints) + " | stopped early | wall |"
        lines += [head, "|---" * (len(checkpoints) + 3) + "|"]
        for label, g in df.groupby("searcher", sort=False):
            cells = []
            for n in checkpoints:
                t, gp = g[f"test@{n}"].astype(float), g[f"gap@{n}"].astype(float)
                cells.append(f"{100 * t.mean():.1f} ± {100 * t.std(ddof=0):.1f} ({100 * gp.mean():.0f}%)")
            lines.append(f"| {label} | " + " | ".join(cells)
                         + f" | {g.stopped_early.sum()}/{g.trials.sum()} | {g.wall_s.mean() / 60:.1f} min |")
        lines.append("")
    for part in ("asha", "throughput", "nsga2"):
        if results.get(part):
            df = pd.DataFrame(results[part])
            lines += ["| " + " | ".join(df.columns) + " |", "|---" * len(df.columns) + "|"]
            lines += ["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |"
                      for r in df.itertuples(index=False)]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="text")
    ap.add_argument("--trials", type=int, nargs="+", default=[25, 50], help="checkpoints on the best-so-far curve")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--out", type=Path, default=Path("runs/bench-search"))
    ap.add_argument("--quick", action="store_true", help="two searchers and small budgets (a smoke run)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import ray

    from searchmerge.bench.zoo import ZOO_NAMES, build_zoo

    bench_path = build_zoo(args.bench) if args.bench in ZOO_NAMES else Path(args.bench)
    args.bench = str(bench_path)
    ray.init(num_cpus=max(3, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False, configure_logging=False)
    prior = args.out / "results.json"
    results: dict[str, Any] = json.loads(prior.read_text()) if prior.exists() else {}
    results["config"] = {"trials": args.trials, "seeds": args.seeds, "bench": args.bench, "cpus": os.cpu_count()}
    scorer = TestScorer(bench_path)
    for part in args.parts:
        t0 = time.perf_counter()
        PARTS[part](args, scorer, results)
        print(f"part {part}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(tables(results, args.trials))


if __name__ == "__main__":
    main()
