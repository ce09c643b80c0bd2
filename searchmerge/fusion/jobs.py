"""Each data-driven method as one job on a loaded bench: statistics (cached), merge, evaluate — timed apart.

``run_fusion(bench, method, params, splits)`` is what a leaderboard row runs. Parameters are checked
against :data:`PARAMS` before any work (unknown names, wrong types, bad values raise ``BenchSpecError``).
Statistics are computed on each model's own task's ``train`` split (``validation`` on request), AdaMerging
learns on ``validation``; the report split is never read by a method, only by the evaluation.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from searchmerge.bench.pool import Bench, BenchSpecError
from searchmerge.fusion.stats import DEFAULT_BATCH, DEFAULT_EXAMPLES, StatsRequest, pool_statistics

Tensor = torch.Tensor
_STATS = {"examples": DEFAULT_EXAMPLES, "batch_size": DEFAULT_BATCH, "seed": 0, "split": "train", "exclude": [],
          "device": "cpu"}
PARAMS: dict[str, dict[str, Any]] = {
    "fisher": {**_STATS, "variant": "batch", "normalize": True, "epsilon": 1e-6},
    "regmean": {**_STATS, "alpha": 0.95},
    "regmean_plusplus": {**_STATS, "alpha": 0.95},
    "ensemble": {"mode": "simple", "weights": None},
    "adamerging": {"granularity": "layer", "steps": 1000, "lr": 1e-3, "init": 0.3, "batch_size": 16,
                   "clamp": False, "seed": 0, "split": "validation", "allow_test": False,
                   "device": "cpu", "ties": False, "ties_density": 0.2},
}


def resolve_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in; unknown methods / names and mistyped values refused before any work."""
    if method not in PARAMS:
        raise BenchSpecError(f"unknown data-driven method `{method}`; methods: {sorted(PARAMS)}.")
    defaults = PARAMS[method]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise BenchSpecError(f"`{method}` has no parameter(s) {unknown}; parameters: {sorted(defaults)}.")
    out = {**defaults, **params}
    for k, v in out.items():
        d = defaults[k]
        ok = (v is None and d is None) or (isinstance(d, bool) and isinstance(v, bool)) or \
             (isinstance(d, int) and not isinstance(d, bool) and isinstance(v, int) and not isinstance(v, bool)) or \
             (isinstance(d, float) and isinstance(v, (int, float)) and not isinstance(v, bool)) or \
             (isinstance(d, str) and isinstance(v, str)) or (isinstance(d, list) and isinstance(v, list)) or \
             (d is None and isinstance(v, list))
        if not ok:
            raise BenchSpecError(f"`{method}` parameter `{k}` = {v!r}: expected {type(d).__name__ if d is not None else 'a list'}.")
    if method in ("regmean", "regmean_plusplus") and not 0.0 <= float(out["alpha"]) <= 1.0:
        raise BenchSpecError(f"`{method}` parameter `alpha` = {out['alpha']!r} must lie in [0, 1] "
                             f"(FusionBench reduce_non_diagonal_ratio: 0.95 for CLIP, 0.6 for GPT-2).")
    if method == "fisher" and float(out["epsilon"]) <= 0:
        raise BenchSpecError(f"`fisher` parameter `epsilon` = {out['epsilon']!r} must be > 0.")
    if method in ("fisher", "regmean", "regmean_plusplus"):
        _request(method, out).check()
    if method == "adamerging":
        from searchmerge.fusion.adamerging import AdaMergingConfig

        AdaMergingConfig(**out).check()
    return out


def _request(method: str, p: dict[str, Any]) -> StatsRequest:
    return StatsRequest("fisher" if method == "fisher" else "gram", examples=p["examples"], seed=p["seed"],
                        batch_size=p["batch_size"], variant=p.get("variant", "batch"), split=p["split"],
                        device=p["device"])


def members(bench: Bench) -> list[str]:
    return [t for t in bench.taskpool.names if t in bench.modelpool.finetuned]


def fusion_merge(bench: Bench, method: str, params: dict[str, Any], *, progress: bool = False) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The merged backbone of a data-driven merge and its times: ``{"stats_s", "merge_s"}``."""
    p = resolve_params(method, params)
    mp = bench.modelpool
    names = members(bench)
    models = [mp.finetuned[t] for t in names]
    t0 = time.perf_counter()
    if method == "fisher":
        stats = pool_statistics(bench, _request(method, p), progress=progress, tasks=names)
        t1 = time.perf_counter()
        from searchmerge.fusion.fisher import fisher_merge

        state = fisher_merge(mp.base, models, [s[0] for s in stats], normalize=p["normalize"],
                             epsilon=float(p["epsilon"]), exclude=p["exclude"])
    elif method == "regmean":
        stats = pool_statistics(bench, _request(method, p), progress=progress, tasks=names)
        t1 = time.perf_counter()
        from searchmerge.fusion.regmean import regmean_merge

        transposed = {k: v for s in stats for k, v in s[1].get("transposed", {}).items()}
        state = regmean_merge(mp.base, models, [s[0] for s in stats], alpha=float(p["alpha"]),
                              transposed=transposed, exclude=p["exclude"])
    elif method == "regmean_plusplus":
        from searchmerge.bench.zoo.common import progress_bar
        from searchmerge.fusion.regmean_pp import regmean_plusplus, step_count

        with progress_bar(progress, "regmean++ (layer by layer)", step_count(bench)) as advance:
            state = regmean_plusplus(bench, _request(method, p), alpha=float(p["alpha"]), exclude=p["exclude"],
                                     advance=advance)
        t1 = time.perf_counter()  # statistics and solves interleave: all counted as statistics
    elif method == "adamerging":
        from searchmerge.fusion.adamerging import AdaMergingConfig, adamerge

        result = adamerge(bench, AdaMergingConfig(**p), progress=progress)
        t1 = time.perf_counter()
        state = result.merged
        return state, {"stats_s": t1 - t0, "merge_s": 0.0, "entropy_first": result.history[0],
                       "entropy_last": result.history[-1]}
    else:
        raise BenchSpecError(f"`{method}` is not a merge (ensembles are evaluated, not merged).")
    return state, {"stats_s": t1 - t0, "merge_s": time.perf_counter() - t1}


def run_fusion(bench: Bench, method: str, params: dict[str, Any], splits: Sequence[str], *,
               progress: bool = False, **eval_kwargs: Any) -> dict[str, Any]:
    """``{"results": {split: evaluate(...)}, "stats_s", "merge_s", "eval_s", "forward_passes"}``."""
    from searchmerge.bench.evaluate import evaluate

    p = resolve_params(method, params)
    if method == "ensemble":
        from searchmerge.fusion.ensemble import ensemble_evaluate

        t0 = time.perf_counter()
        results = {s: ensemble_evaluate(bench, s, p["mode"], weights=p["weights"],
                                        batch_size=int(eval_kwargs.get("batch_size", 64))) for s in splits}
        return {"results": results, "stats_s": 0.0, "merge_s": 0.0, "eval_s": time.perf_counter() - t0,
                "forward_passes": len(members(bench))}
    state, times = fusion_merge(bench, method, p, progress=progress)
    t0 = time.perf_counter()
    model = bench.modelpool.model(state, name=method)
    results = {s: evaluate(model, bench.taskpool, s, **eval_kwargs) for s in splits}
    return {"results": results, **times, "eval_s": time.perf_counter() - t0, "forward_passes": 1}
