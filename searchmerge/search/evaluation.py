"""Trial evaluation on the resident model: chunks interleave tasks in a fixed shuffled order, so a partial
result after any prefix of chunks is an unbiased estimate of the final one (what ASHA stops on)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from searchmerge.bench.chunks import chunk_features, plan_chunks, token_lengths  # noqa: F401  (re-exported)
from searchmerge.bench.evaluate import _Scorer, model_features


def build_eval_module(bench_model: Any, num_threads: int = 1, keep_base: bool = False,
                      task_vector_norm: float = 1.0):  # noqa: ANN201
    """The resident evaluation model (its state dict keys are the merged backbone's), with the task heads.

    ``keep_base`` keeps a copy of θ₀ beside it (one more model's memory) for the model-statistic objectives."""
    import torch

    torch.set_num_threads(num_threads)
    runner = bench_model.runner()
    module = runner.module
    object.__setattr__(module, "_sm_runner", runner)  # a plain attribute: not a parameter, never merged into
    if keep_base:
        base = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}
        object.__setattr__(module, "_sm_base", base)
        object.__setattr__(module, "_sm_tv_norm", float(task_vector_norm))
    return module


def delta_stats(module: Any) -> dict[str, float]:
    """``delta_l2`` = ‖θ − θ₀‖₂ / mean_i ‖τ_i‖₂ and ``delta_l0`` = the fraction of entries with θ ≠ θ₀."""
    import torch

    sd = module.state_dict()
    sq, moved, total = 0.0, 0, 0
    for k, b in module._sm_base.items():
        d = sd[k].detach().double() - b.double()
        sq += float(torch.sum(d * d))
        moved += int(torch.count_nonzero(d))
        total += d.numel()
    return {"delta_l2": sq ** 0.5 / module._sm_tv_norm, "delta_l0": moved / max(1, total)}


def mean_task_vector_norm(base: dict[str, Any], finetuned: Sequence[dict[str, Any]]) -> float:
    """mean_i ‖θ_i − θ₀‖₂ over the floating tensors: the unit of ``delta_l2``."""
    import torch

    norms = []
    for sd in finetuned:
        sq = sum(float(torch.sum((sd[k].double() - v.double()) ** 2)) for k, v in base.items() if v.is_floating_point())
        norms.append(sq ** 0.5)
    return float(np.mean(norms)) if norms else 1.0


def predict_chunk(module: Any, task: str, batch: dict[str, np.ndarray]) -> np.ndarray:
    return module._sm_runner.predict(task, batch)


def exact_model(bench: Any) -> Any:
    """The base BenchModel with prefix caching off: a searched merge may move every layer, so every trial
    runs the whole forward (the cached-prefix shortcut is only exact for models that share the prefix)."""
    import dataclasses

    return dataclasses.replace(bench.modelpool.model(), prefix_layers=None)


def split_features(bench: Any, split: str, tasks: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    feats, _ = model_features(exact_model(bench), bench.taskpool, list(tasks), split)
    return feats


def new_scorer(taskpool: Any, split: str, tasks: Sequence[str]) -> _Scorer:
    return _Scorer(taskpool, split, list(tasks))


def split_only(taskpool: Any, split: str) -> Any:
    """The task pool with one split's data only: what trial processes get, so the report split never reaches
    them (and no model pool is shipped: trials read the resident store)."""
    import dataclasses

    from searchmerge.bench.pool import TaskPool

    tasks = {n: dataclasses.replace(t, splits={split: t.splits[split]}) for n, t in taskpool.tasks.items()}
    return TaskPool(taskpool.spec, tasks)


def objective_values(result: dict[str, Any]) -> dict[str, float]:
    """The objective metrics of a (partial or final) evaluation result."""
    per = result["per_task"]
    out = {"average": float(result["average"]), "worst": float(min(per.values())) if per else 0.0}
    for t, v in per.items():
        out[f"task_{t}"] = float(v)
    return out


