"""A FusionBench-style leaderboard: fixed recipes run as single-trial jobs, one table per split.

Rows: the pretrained backbone (with the task heads), each fine-tuned model on its own task, simple
average, task arithmetic (λ=0.3), TIES and DARE-TIES (FusionBench presets), the data-free methods
registered at run time (``magmax``, ``model_stock``, ``iso_c``, ``tsv_m``), and a task-arithmetic λ
sweep that shows how coefficient-sensitive merging is, and the data-driven rows (``kind="fusion"``, see
:mod:`searchmerge.fusion.jobs`): Fisher merging, RegMean and RegMean++ on 256 train examples per model, task- and
layer-wise AdaMerging adapted on unlabelled validation batches (and AdaMerging++ on TIES vectors), and prediction ensembles (evaluated, not
merged: N forward passes per example). Written atomically as Markdown, CSV and Parquet.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from searchmerge.bench.evaluate import evaluate
from searchmerge.bench.pool import Bench, BenchSpec, load_bench


@dataclass(frozen=True)
class Entry:
    """One leaderboard job: a label and a merge recipe (method + global parameters), or a reference row."""

    label: str
    method: str | None = None  # None: "pretrained" / "individual"
    parameters: dict[str, Any] = field(default_factory=dict)
    kind: str = "merge"  # "fusion": a data-driven method of searchmerge.fusion.jobs (fisher, regmean, ...)


FIXED: list[Entry] = [
    Entry("pretrained"),
    Entry("individual"),
    Entry("simple_average", "linear"),
    Entry("task_arithmetic", "task_arithmetic", {"lambda": 0.3}),
    Entry("ties", "ties", {"density": 0.2, "lambda": 0.3, "merge_func": "sum", "trim_scope": "model"}),
    Entry("dare_ties", "dare_ties", {"density": 0.5, "rescale": "inverse", "trim_density": 0.2,
                                      "trim_scope": "model", "merge_func": "sum", "lambda": 0.5}),
]
OPTIONAL = ["magmax", "model_stock", "iso_c", "tsv_m"]
SWEEP_LAMBDAS = (0.1, 0.5, 0.7, 1.0)
# AdaMerging on this project's 2-core budget: 200 steps at lr 5e-3 (FusionBench: 1000 at 1e-3; same λ travel)
ADAMERGING = {"steps": 200, "lr": 5e-3}
FUSION: list[Entry] = [
    Entry("fisher", "fisher", {}, kind="fusion"),
    Entry("regmean", "regmean", {}, kind="fusion"),
    Entry("regmean_plusplus", "regmean_plusplus", {}, kind="fusion"),
    Entry("adamerging_task", "adamerging", {"granularity": "task", **ADAMERGING}, kind="fusion"),
    Entry("adamerging_layer", "adamerging", {"granularity": "layer", **ADAMERGING}, kind="fusion"),
    Entry("adamerging_pp_task", "adamerging", {"granularity": "task", "ties": True, **ADAMERGING}, kind="fusion"),
    Entry("adamerging_pp_layer", "adamerging", {"granularity": "layer", "ties": True, **ADAMERGING}, kind="fusion"),
    Entry("ensemble_simple", "ensemble", {"mode": "simple"}, kind="fusion"),
    Entry("ensemble_max", "ensemble", {"mode": "max"}, kind="fusion"),
]


def default_entries(sweep: Sequence[float] = SWEEP_LAMBDAS, fusion: bool = True) -> list[Entry]:
    """The fixed recipes, the optional methods registered now, the data-driven rows, then the λ sweep."""
    from searchmerge.methods.registry import list_methods

    registered = {m.name for m in list_methods()}
    out = list(FIXED) + [Entry(m, m) for m in OPTIONAL if m in registered]
    out += list(FUSION) if fusion else []
    out += [Entry(f"task_arithmetic λ={lam:g}", "task_arithmetic", {"lambda": lam}) for lam in sweep if lam != 0.3]
    return out


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _merge(bench: Bench, entry: Entry) -> dict[str, Any]:
    from searchmerge.merge import merge
    from searchmerge.recipe import Recipe

    mp = bench.modelpool
    names = [t for t in bench.taskpool.names if t in mp.finetuned]
    recipe = Recipe(method=entry.method, base_model="base", models=[{"model": n} for n in names],
                    parameters=entry.parameters)
    if recipe.spec.base == "none":
        recipe = Recipe(method=entry.method, models=[{"model": n} for n in names], parameters=entry.parameters)
        return merge(recipe, models=[mp.finetuned[n] for n in names])  # type: ignore[return-value]
    return merge(recipe, base=mp.base, models=[mp.finetuned[n] for n in names])  # type: ignore[return-value]


def run_entry(bench: Bench, entry: Entry, splits: Sequence[str], *, progress: bool = False,
              **eval_kwargs: Any) -> list[dict[str, Any]]:
    """Run one job; one row per split: label, method, params, per-task metrics, average, times.

    ``progress``: show the statistics / adaptation passes of the data-driven rows."""
    mp, tp = bench.modelpool, bench.taskpool
    rows = []
    t0 = time.perf_counter()
    stats_s, passes = 0.0, 1
    if entry.kind == "fusion":
        from searchmerge.fusion.jobs import run_fusion

        job = run_fusion(bench, str(entry.method), entry.parameters, splits, progress=progress, **eval_kwargs)
        results, merge_s, stats_s, passes = job["results"], job["merge_s"], job["stats_s"], job["forward_passes"]
    elif entry.method is None and entry.label == "individual":
        merge_s = 0.0
        per_split: dict[str, dict[str, float]] = {s: {} for s in splits}
        for t in tp.names:
            if t not in mp.finetuned:
                continue
            model = mp.model(mp.finetuned[t], name=f"ft:{t}")
            for s in splits:
                per_split[s][t] = evaluate(model, tp, s, tasks=[t], **eval_kwargs)["per_task"][t]
        results = {s: {"per_task": per_split[s]} for s in splits}
    else:
        if entry.method is None:
            state, merge_s = mp.base, 0.0
        else:
            state = _merge(bench, entry)
            merge_s = time.perf_counter() - t0
        model = mp.model(state, name=entry.label)
        results = {s: evaluate(model, tp, s, **eval_kwargs) for s in splits}
    total_s = time.perf_counter() - t0
    for s in splits:
        per_task = results[s]["per_task"]
        flagged = chance_failures(bench, per_task) if entry.label == "individual" else []
        if flagged:
            import sys

            print(f"WARNING: individual model(s) at or below chance on their own task ({s}): {flagged}; "
                  f"check the head / preprocessing options of the model pool.", file=sys.stderr)
        rows.append({
            "method": entry.label,
            "recipe": entry.method or "",
            "parameters": json.dumps(entry.parameters, sort_keys=True) if entry.parameters else "",
            "split": s,
            **{f"task:{t}": float(v) for t, v in per_task.items()},
            "average": float(sum(per_task.values()) / max(1, len(per_task))),
            "merge_s": round(merge_s, 3),
            "stats_s": round(stats_s, 3),
            "time_s": round(total_s, 3),
            "forward_passes": passes,
            "at_or_below_chance": ",".join(flagged),
        })
    return rows


def chance_failures(bench: Bench, per_task: dict[str, float]) -> list[str]:
    """Tasks whose accuracy is at or below chance (1 / classes): an individual model there means a broken setup."""
    tp = bench.taskpool
    return [t for t, v in per_task.items()
            if tp.tasks[t].spec.metric == "accuracy" and float(v) <= 1.0 / max(1, tp.tasks[t].num_classes) + 1e-9]


def to_markdown(rows: list[dict[str, Any]], tasks: Sequence[str], splits: Sequence[str]) -> str:
    out = []
    for s in splits:
        out.append(f"### {s}\n")
        out.append("| method | " + " | ".join(tasks) + " | **avg** | time (s) | of which statistics (s) | passes |")
        out.append("|---|" + "---|" * (len(tasks) + 4))
        for r in rows:
            if r["split"] != s:
                continue
            cells = [f"{100 * r[f'task:{t}']:.1f}" if f"task:{t}" in r else "–" for t in tasks]
            flag = f" ⚠ at/below chance: {r['at_or_below_chance']}" if r.get("at_or_below_chance") else ""
            out.append(f"| {r['method']}{flag} | " + " | ".join(cells) + f" | **{100 * r['average']:.1f}** | "
                       f"{r['time_s']:.1f} | {r.get('stats_s', 0.0):.1f} | {r.get('forward_passes', 1)} |")
        out.append("")
    return "\n".join(out)


def write_tables(rows: list[dict[str, Any]], out_dir: Path, tasks: Sequence[str], splits: Sequence[str],
                 title: str = "") -> dict[str, Path]:
    """``leaderboard.md``, ``.csv`` and ``.parquet`` in ``out_dir`` (each written to a temp file, then renamed)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    cols = ["method", "recipe", "parameters", "split"] + [f"task:{t}" for t in tasks] + ["average", "merge_s", "stats_s", "time_s", "forward_passes", "at_or_below_chance"]
    table = pa.table({c: [r.get(c) for r in rows] for c in cols})
    paths = {"md": out_dir / "leaderboard.md", "csv": out_dir / "leaderboard.csv", "parquet": out_dir / "leaderboard.parquet"}
    md = (f"## {title}\n\nAccuracy (%) per task; time = statistics / adaptation + merge + evaluation of all listed "
          f"splits; passes = forward passes per example (an ensemble runs every model).\n\n" if title else "")
    md += to_markdown(rows, tasks, splits)
    _atomic_write(paths["md"], lambda p: p.write_text(md))
    _atomic_write(paths["csv"], lambda p: pcsv.write_csv(table, p))
    _atomic_write(paths["parquet"], lambda p: pq.write_table(table, p))
    return paths


def run_leaderboard(
    pool_spec: BenchSpec | Bench | str | Path,
    out_dir: str | Path,
    splits: Sequence[str] = ("validation", "test"),
    *,
    entries: Sequence[Entry] | None = None,
    progress: bool = True,
    **eval_kwargs: Any,
) -> dict[str, Any]:
    """Run every entry (default: :func:`default_entries`) and write the tables after each job.

    Returns ``{"rows": [...], "paths": {...}, "wall_s": ...}``. ``eval_kwargs`` go to :func:`evaluate`
    (e.g. ``backend="ray"``).
    """
    t0 = time.perf_counter()
    bench = pool_spec if isinstance(pool_spec, Bench) else load_bench(pool_spec)
    entries = list(entries) if entries is not None else default_entries()
    for e in entries:  # a data-driven row's parameters are checked before any job runs
        if e.kind == "fusion":
            from searchmerge.fusion.jobs import resolve_params

            resolve_params(str(e.method), e.parameters)
    out = Path(out_dir)
    tasks = bench.taskpool.names
    rows: list[dict[str, Any]] = []
    paths: dict[str, Path] = {}
    console = None
    if progress:
        from rich.console import Console

        console = Console(stderr=True)
    for i, e in enumerate(entries):
        new = run_entry(bench, e, splits, progress=progress, **eval_kwargs)
        rows += new
        paths = write_tables(rows, out, tasks, splits, title=f"{bench.spec.name} leaderboard")
        if console is not None:
            avg = " ".join(f"{r['split']}={100 * r['average']:.1f}" for r in new)
            console.print(f"[{i + 1}/{len(entries)}] {e.label}: {avg} ({new[0]['time_s']:.1f} s)")
    return {"rows": rows, "paths": paths, "wall_s": time.perf_counter() - t0}
