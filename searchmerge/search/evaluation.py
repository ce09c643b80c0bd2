"""Trial evaluation on the resident model: chunks interleave tasks in a fixed shuffled order, so a partial
result after any prefix of chunks is an unbiased estimate of the final one (what ASHA stops on)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from searchmerge.bench.evaluate import _Scorer, model_features


def plan_chunks(sizes: dict[str, int], batch_size: int, seed: int = 0,
                lengths: dict[str, np.ndarray] | None = None) -> list[tuple[str, np.ndarray]]:
    """``(task, indices)`` chunks of at most ``batch_size`` examples, in a seeded order that interleaves tasks
    (the batches of all tasks ordered by their relative position), so every prefix covers each task in
    proportion.

    With ``lengths`` (tokens per example) each task's examples are **length-bucketed**: sorted by length
    (ties in a seeded order) and cut into batches, so a batch pads to about its own length instead of the
    longest text of a random draw (2.2-2.9x fewer padded tokens on the text zoo). The batches of a task are
    then visited in a seeded shuffled order, so each example is equally likely to fall in any prefix: a
    partial result stays an unbiased estimate of the final one (with some more variance than random
    batches, as each batch is one length stratum)."""
    rng = np.random.default_rng(seed)
    keyed = []
    for t, n in sizes.items():
        perm = rng.permutation(n)
        if lengths is not None:
            perm = perm[np.argsort(np.asarray(lengths[t])[perm], kind="stable")]
        parts = [perm[s:s + batch_size] for s in range(0, n, batch_size)]
        if lengths is not None:
            parts = [parts[j] for j in rng.permutation(len(parts))]
        for j, idx in enumerate(parts):
            keyed.append(((j + rng.random()) / len(parts), t, np.sort(idx)))
    keyed.sort(key=lambda x: x[0])
    return [(t, idx) for _, t, idx in keyed]


def token_lengths(features: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """Tokens per example for text features (``attention_mask``); ``None`` for fixed-size inputs."""
    if not all("attention_mask" in f for f in features.values()):
        return None
    return {t: f["attention_mask"].sum(1) for t, f in features.items()}


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


def chunk_features(features: dict[str, dict[str, np.ndarray]], task: str, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in features[task].items()}


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


