"""Trial evaluation on the resident model: chunks interleave tasks in a fixed shuffled order, so a partial
result after any prefix of chunks is an unbiased estimate of the final one (what ASHA stops on)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from searchmerge.bench.evaluate import _Scorer, model_features


def plan_chunks(sizes: dict[str, int], batch_size: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """``(task, indices)`` chunks: each task's examples shuffled (seeded), cut into batches, and the batches of
    all tasks ordered by their relative position so every prefix covers each task in proportion."""
    rng = np.random.default_rng(seed)
    keyed = []
    for t, n in sizes.items():
        perm = rng.permutation(n)
        parts = [perm[s:s + batch_size] for s in range(0, n, batch_size)]
        for j, idx in enumerate(parts):
            keyed.append(((j + rng.random()) / len(parts), t, np.sort(idx)))
    keyed.sort(key=lambda x: x[0])
    return [(t, idx) for _, t, idx in keyed]


def build_eval_module(bench_model: Any, num_threads: int = 1):  # noqa: ANN201
    """The resident evaluation model (its state dict keys are the merged backbone's), with the task heads."""
    import torch

    torch.set_num_threads(num_threads)
    runner = bench_model.runner()
    module = runner.module
    object.__setattr__(module, "_sm_runner", runner)  # a plain attribute: not a parameter, never merged into
    return module


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


def new_scorer(bench: Any, split: str, tasks: Sequence[str]) -> _Scorer:
    return _Scorer(bench.taskpool, split, list(tasks))


def objective_values(result: dict[str, Any]) -> dict[str, float]:
    """The objective metrics of a (partial or final) evaluation result."""
    per = result["per_task"]
    out = {"average": float(result["average"]), "worst": float(min(per.values())) if per else 0.0}
    for t, v in per.items():
        out[f"task_{t}"] = float(v)
    return out


