"""The run folder: ``trials.parquet`` (written as trials finish), ``best.yaml`` / ``front/``, ``summary.json``,
PNG + HTML plots; and the report-split re-evaluation of the best recipe (or front) beside fixed baselines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Callback

from searchmerge.search.spec import SearchSpec

TRIAL_FIELDS = ("average", "worst", "delta_l2", "delta_l0", "examples", "merge_s", "eval_s", "start_time", "end_time", "recipe_yaml",
                "recipe_key", "method", "duplicate", "replica", "node", "store_retries",
                "stats_s", "stats_computed", "stats_hits")  # the last three: data-driven (fusion) trials only


def _atomic_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    tmp = path.with_suffix(".parquet.tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    tmp.replace(path)


def read_trials(out: Path) -> list[dict[str, Any]]:
    p = Path(out) / "trials.parquet"
    if not p.exists():
        return []
    import pandas as pd

    return [{k: _none_if_nan(v) for k, v in r.items()} for r in pd.read_parquet(p).to_dict("records")]


def _none_if_nan(v: Any) -> Any:
    """Parquet gives NaN for a missing float (a failed trial has no metrics); rows use None for missing."""
    return None if isinstance(v, float) and v != v else v


class TrialRecorder(Callback):
    """A Tune callback on the driver: one row per finished (or failed / stopped) trial, rewritten atomically."""

    def __init__(self, out: Path, spec: SearchSpec, prior: list[dict[str, Any]]) -> None:
        self.path = Path(out) / "trials.parquet"
        self.spec = spec
        self.rows = list(prior)
        self.seen = {r["trial_id"] for r in prior}
        self.last: dict[str, dict[str, Any]] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # where Tune saves its state on the driver (run folder's tune/ is a copy synced in the background): a
        # mirrored run folder (--out URI) pushes a consistent snapshot of Tune's state from there
        self.tune_state = getattr(getattr(trial, "storage", None), "experiment_driver_staging_path", None)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        self.last[trial.trial_id] = result

    def _row(self, trial: Any, status: str, error: str = "") -> None:
        if trial.trial_id in self.seen:
            return
        self.seen.add(trial.trial_id)
        res = self.last.get(trial.trial_id) or {}
        row: dict[str, Any] = {"trial": len(self.rows), "trial_id": trial.trial_id, "searcher": self.spec.searcher,
                               "status": status, "error": error[-2000:]}
        row["trial_retries"] = int(getattr(trial, "num_failures", 0) or 0)  # runs lost with a process or node
        row.update({f"config/{k}": v for k, v in trial.config.items()})
        for k, v in res.items():
            if k in TRIAL_FIELDS or k.startswith("task_"):
                row[k] = v
        if status == "done" and not res.get("complete"):
            row["status"] = "stopped"  # an early stop (ASHA) after a fraction of the split
        if "merge_s" in row and "eval_s" in row and "start_time" in row:
            row["total_s"] = float(res.get("end_time", time.time()) - row["start_time"])
        row["finished_at"] = time.time()
        self.rows.append(row)
        self.flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._row(trial, "done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        err = ""
        try:
            err = str(trial.error_file and Path(trial.error_file).read_text()) if hasattr(trial, "error_file") else ""
        except Exception:  # noqa: BLE001
            err = "trial failed"
        self._row(trial, "failed", err.strip().splitlines()[-1] if err.strip() else "trial failed")

    def reconcile(self, grid: Any) -> None:
        """Add a row for every trial of Tune's result grid that has none (a restored search: Tune restores its
        own pickled callbacks, not this one, so trials finished after a resume are recorded here)."""
        for res in grid:
            trial_id = res.metrics.get("trial_id") if res.metrics else None
            if trial_id is None or trial_id in self.seen:
                continue
            self.last[trial_id] = res.metrics
            stub = type("T", (), {"trial_id": trial_id, "config": res.config or {}})()
            if res.error is not None:
                self._row(stub, "failed", str(res.error).strip().splitlines()[-1] if str(res.error).strip() else "failed")
            else:
                self._row(stub, "done")

    def flush(self) -> None:
        if self.rows:
            _atomic_parquet(self.rows, self.path)
            from searchmerge.io.remote import mirror_flush

            mirror_flush(self.path.parent, getattr(self, "tune_state", None))  # --out URI: live files to the URI

    def __setstate__(self, state: dict[str, Any]) -> None:
        """``Tuner.restore`` unpickles the callbacks pickled when the search started: rows from disk, not from then
        (else the first trial after ``--resume`` would rewrite trials.parquet without the ones finished before)."""
        self.__dict__.update(state)
        if self.path.exists():
            self.rows = read_trials(self.path.parent)
            self.seen = {r["trial_id"] for r in self.rows}


# --- after the search -----------------------------------------------------------------------------------


def _objective_matrix(rows: list[dict[str, Any]], spec: SearchSpec) -> np.ndarray:
    return np.array([[float(r[o.key]) for o in spec.objectives] for r in rows], dtype=float)


def pareto_front(values: np.ndarray, modes: list[str]) -> np.ndarray:
    """Indices of the non-dominated rows (moocore, maximising where the mode says so)."""
    import moocore

    if len(values) == 0:
        return np.zeros(0, int)
    return np.flatnonzero(moocore.is_nondominated(values, maximise=[m == "max" for m in modes]))


def hypervolume(values: np.ndarray, ref: list[float], modes: list[str]) -> float:
    import moocore

    if len(values) == 0:
        return 0.0
    return float(moocore.hypervolume(values, ref=ref, maximise=[m == "max" for m in modes]))


def default_reference(spec: SearchSpec) -> list[float]:
    """Metrics lie in [0, 1]: the worst corner (0 for a maximised metric, 1 for a minimised one)."""
    return list(spec.reference_point) if spec.reference_point else [0.0 if o.mode == "max" else 1.0 for o in spec.objectives]


def _report_eval(spec: SearchSpec, bench: Any, replicas: list, recipe: Any, tasks: list[str],
                 split: str | None = None, stats: bool = False, fusion: Any = None) -> dict[str, Any]:
    """``recipe`` merged on the first replica and scored on ``tasks`` of ``split`` (default: the report split);
    with ``stats`` the model statistics come along (``delta_l2``, ``delta_l0``). A data-driven candidate is
    merged from ``fusion`` (its statistics from the disk cache the trials filled)."""
    from searchmerge.search.driver import evaluate_resident
    from searchmerge.search.evaluation import new_scorer, plan_chunks, split_features, token_lengths

    split = split or spec.report_split
    store, ev = replicas[0]
    feats = split_features(bench, split, tasks)
    sizes = {t: len(bench.taskpool.tasks[t].splits[split]) for t in tasks}
    out = evaluate_resident(store, ev, recipe, feats, plan_chunks(sizes, spec.eval_batch_size, 0, token_lengths(feats)),
                            new_scorer(bench.taskpool, split, tasks), stats=stats, fusion=fusion)
    return out["result"] | ({"stats": out["stats"]} if stats else {})


def search_split_baselines(spec: SearchSpec, bench: Any, replicas: list, tasks: list[str]) -> dict[str, list[float]]:
    """The objectives of the fixed baselines (pretrained, TA λ=0.3) on the *search* split, where the trials are:
    what a Pareto plot can put beside the front without mixing splits."""
    from searchmerge.recipe import Recipe
    from searchmerge.search.evaluation import objective_values
    from searchmerge.search.spec import STAT_METRICS

    stats = any(o.metric in STAT_METRICS for o in spec.objectives)
    out = {}
    for name, lam in (("pretrained", 0.0), ("task_arithmetic_0.3", 0.3)):
        r = Recipe(method="task_arithmetic", base_model="base", models=[{"model": n} for n in tasks], parameters={"lambda": lam})
        res = _report_eval(spec, bench, replicas, r, tasks, split=spec.search_split, stats=stats)
        vals = objective_values(res) | res.get("stats", {})
        out[name] = [float(vals[o.key]) for o in spec.objectives]
    return out


def baselines(spec: SearchSpec, bench: Any, replicas: list, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Pretrained, task arithmetic λ=0.3 and each individual model on its own task (report split)."""
    from searchmerge.recipe import Recipe

    ta = lambda lam, names: Recipe(method="task_arithmetic", base_model="base",  # noqa: E731
                                   models=[{"model": n} for n in names], parameters={"lambda": lam})
    out = {"pretrained": _report_eval(spec, bench, replicas, ta(0.0, tasks), tasks),
           "task_arithmetic_0.3": _report_eval(spec, bench, replicas, ta(0.3, tasks), tasks)}
    per = {t: _report_eval(spec, bench, replicas, ta(1.0, [t]), [t])["per_task"][t] for t in tasks}  # its own task only
    out["individual"] = {"per_task": per, "average": float(np.mean(list(per.values())))}
    return out


def finish_run(out: Path, spec: SearchSpec, bench: Any, space: Any, replicas: list, t_start: float,
               fusion: Any = None) -> dict[str, Any]:
    from searchmerge.io.writer import atomic_write_text
    from searchmerge.mergekit import to_mergekit_yaml
    from searchmerge.recipe import Recipe
    from searchmerge.search.fusion import is_data_recipe

    out = Path(out)
    rows = read_trials(out)
    tasks = bench.taskpool.names
    done = [r for r in rows if r.get("status") == "done" and r.get("examples") is not None]
    modes = [o.mode for o in spec.objectives]
    summary: dict[str, Any] = {
        "name": spec.name, "searcher": spec.searcher, "search_split": spec.search_split, "report_split": spec.report_split,
        "trials": len(rows), "completed": len(done), "failed": sum(r.get("status") == "failed" for r in rows),
        "stopped_early": sum(r.get("status") == "stopped" for r in rows),
        "duplicates": int(sum(bool(r.get("duplicate")) for r in rows if r.get("duplicate") is not None)),
        "examples_evaluated": int(sum(float(r.get("examples") or 0) for r in rows if not r.get("duplicate"))),
        "search_wall_s": time.time() - t_start, "objectives": [o.model_dump() for o in spec.objectives],
    }
    base = baselines(spec, bench, replicas, tasks)
    summary["baselines"] = {k: {"average": v["average"], "per_task": v["per_task"]} for k, v in base.items()}

    def mk(text: str, stem: Path) -> dict[str, Any]:
        recipe = Recipe.from_yaml(text)
        res = _report_eval(spec, bench, replicas, recipe, tasks, fusion=fusion)
        atomic_write_text(stem.with_suffix(".yaml"), text)
        if is_data_recipe(recipe):
            atomic_write_text(stem.parent / f"{stem.name}.mergekit.txt",
                              f"not expressible in MergeKit: `{recipe.method}` is computed from data; "
                              f"`searchmerge merge {stem.name}.yaml --out DIR` reproduces it\n")
            return {"recipe_yaml": text, "report": {"average": res["average"], "per_task": res["per_task"]}}
        try:
            atomic_write_text(stem.parent / f"{stem.name}.mergekit.yaml", to_mergekit_yaml(recipe))
        except Exception as exc:  # noqa: BLE001 - not every recipe has a MergeKit form
            atomic_write_text(stem.parent / f"{stem.name}.mergekit.txt", f"not expressible in MergeKit: {exc}\n")
        return {"recipe_yaml": text, "report": {"average": res["average"], "per_task": res["per_task"]}}

    if done:
        vals = _objective_matrix(done, spec)
        if len(spec.objectives) == 1:
            i = int(np.argmax(vals[:, 0]) if modes[0] == "max" else np.argmin(vals[:, 0]))
            best = mk(done[i]["recipe_yaml"], out / "best")
            best["search"] = {o.key: float(done[i][o.key]) for o in spec.objectives} | {"trial": int(done[i]["trial"])}
            summary["best"] = best
            ta, ind = base["task_arithmetic_0.3"]["average"], base["individual"]["average"]
            summary["gap_closed"] = (best["report"]["average"] - ta) / (ind - ta) if ind != ta else None
        else:
            ref = default_reference(spec)
            front = pareto_front(vals, modes)
            (out / "front").mkdir(exist_ok=True)
            summary["front"] = []
            for j, i in enumerate(front):
                m = mk(done[i]["recipe_yaml"], out / "front" / f"{j:03d}")
                m["search"] = {o.key: float(done[i][o.key]) for o in spec.objectives}
                summary["front"].append(m)
            summary["reference_point"] = ref
            summary["hypervolume"] = hypervolume(vals[front], ref, modes)
    if len(spec.objectives) > 1:
        summary["search_split_baselines"] = search_split_baselines(spec, bench, replicas, tasks)
    summary["plots"] = write_plots(out, spec, rows, summary.get("search_split_baselines"))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float))
    return summary


def curves(spec: SearchSpec, rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Best-so-far (single objective) or hypervolume (several) after every trial, by trial and by time."""
    modes = [o.mode for o in spec.objectives]
    order = sorted(rows, key=lambda r: r.get("finished_at", 0.0))
    t0 = min((r.get("start_time") or r.get("finished_at", 0.0)) for r in order) if order else 0.0
    xs, ts, ys = [], [], []
    kept: list[list[float]] = []
    best = None
    for k, r in enumerate(order):
        if r.get("status") == "done" and r.get(spec.objectives[0].key) is not None:
            v = [float(r[o.key]) for o in spec.objectives]
            kept.append(v)
            if len(v) == 1:
                best = v[0] if best is None else (max(best, v[0]) if modes[0] == "max" else min(best, v[0]))
        if len(spec.objectives) > 1:
            y = hypervolume(np.array(kept), default_reference(spec), modes) if kept else 0.0
        else:
            y = best if best is not None else float("nan")
        xs.append(k + 1)
        ts.append(float(r.get("finished_at", t0)) - t0)
        ys.append(y)
    return {"trial": xs, "seconds": ts, "value": ys}


def write_plots(out: Path, spec: SearchSpec, rows: list[dict[str, Any]],
                marks: dict[str, list[float]] | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    c = curves(spec, rows)
    label = "hypervolume" if len(spec.objectives) > 1 else f"best {spec.objectives[0].key} ({spec.search_split})"
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x, xl in ((axes[0], c["trial"], "trial"), (axes[1], c["seconds"], "seconds")):
        ax.step(x, c["value"], where="post")
        ax.set_xlabel(xl)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{spec.name}: {spec.searcher}")
    fig.tight_layout()
    p = out / ("hypervolume.png" if len(spec.objectives) > 1 else "best_so_far.png")
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(str(p))
    h = go.Figure(go.Scatter(x=c["trial"], y=c["value"], mode="lines+markers", line_shape="hv"))
    h.update_layout(title=f"{spec.name}: {label}", xaxis_title="trial", yaxis_title=label)
    hp = p.with_suffix(".html")
    h.write_html(hp, include_plotlyjs=True)
    paths.append(str(hp))
    if len(spec.objectives) >= 2:
        paths += pareto_plot(out, spec, rows, marks or {})
    return paths


def pareto_plot(out: Path, spec: SearchSpec, rows: list[dict[str, Any]], marks: dict[str, list[float]]) -> list[str]:
    """Every pair of objectives: the trials, the front (non-dominated in all objectives) and the baselines."""
    import itertools

    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("status") == "done"]
    m = len(spec.objectives)
    vals = _objective_matrix(done, spec) if done else np.zeros((0, m))
    fr = pareto_front(vals, [o.mode for o in spec.objectives])
    pairs = list(itertools.combinations(range(m), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        ax.scatter(vals[:, i], vals[:, j], s=12, alpha=0.5, label="trials")
        ax.scatter(vals[fr, i], vals[fr, j], s=30, c="red", label="front")
        for name, v in marks.items():
            ax.scatter([v[i]], [v[j]], marker="*", s=120, label=name)
        ax.set_xlabel(f"{spec.objectives[i].key} ({spec.objectives[i].mode})")
        ax.set_ylabel(f"{spec.objectives[j].key} ({spec.objectives[j].mode})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{spec.name}: {spec.search_split} split")
    fig.tight_layout()
    pp = out / "pareto.png"
    fig.savefig(pp, dpi=100)
    plt.close(fig)
    import plotly.graph_objects as go

    dims = [{"label": o.key, "values": vals[:, i]} for i, o in enumerate(spec.objectives)]
    on_front = np.isin(np.arange(len(vals)), fr)
    h = go.Figure(go.Splom(dimensions=dims, diagonal_visible=False, showupperhalf=False,
                           text=[f"trial {int(r['trial'])}: {r.get('method')}" for r in done],
                           marker={"color": np.where(on_front, "red", "steelblue"), "size": np.where(on_front, 9, 5)}))
    h.update_layout(title=f"{spec.name}: trials (front in red), {spec.search_split} split")
    hp = out / "pareto.html"
    h.write_html(hp, include_plotlyjs=True)
    return [str(pp), str(hp)]


def render_report(out: Path) -> str:
    """A rich table of the run folder's summary (best or front, baselines, report-split metrics)."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    s = json.loads((Path(out) / "summary.json").read_text())
    table = Table(title=f"{s['name']} — {s['searcher']}: {s['completed']} of {s['trials']} trials "
                        f"({s['failed']} failed, {s['stopped_early']} stopped early)")
    table.add_column("row")
    table.add_column(f"{s['report_split']} average", justify="right")
    for k, v in s["baselines"].items():
        table.add_row(k, f"{100 * v['average']:.1f}")
    if "best" in s:
        table.add_row("best searched", f"{100 * s['best']['report']['average']:.1f}")
    for j, m in enumerate(s.get("front", [])):
        table.add_row(f"front {j:03d} {m['search']}", f"{100 * m['report']['average']:.1f}")
    buf = StringIO()
    console = Console(file=buf, width=140)
    console.print(table)
    if s.get("gap_closed") is not None:
        console.print(f"TA(λ=0.3)→individual gap closed on {s['report_split']}: {100 * s['gap_closed']:.1f}%")
    if "hypervolume" in s:
        console.print(f"hypervolume {s['hypervolume']:.4f} (reference point {s['reference_point']})")
    console.print("plots: " + ", ".join(s["plots"]))
    return buf.getvalue()
