"""Evaluate a :class:`BenchModel` on a task pool: in-process, or on long-lived Ray actors fed by Ray Data;
same metrics.

Both paths run the very same :class:`~searchmerge.bench.families.Runner` on the very same preprocessed
arrays (tokenised / normalised once, cached on disk by what they depend on: :mod:`.features_cache`), in the
same length-bucketed, task-interleaved chunk plan (:mod:`.chunks`), and put each prediction back at its
(task, index) before scoring. The evaluators (:mod:`.evaluators`) are kept across calls: a repeated
``evaluate`` on one pool copies the new weights into the already built model (and actors) instead of
rebuilding them. :func:`iter_evaluate` yields partial metrics after every chunk — an unbiased estimate, as
chunks interleave tasks — so a search can drop a weak candidate early; :func:`evaluate` returns the final
plain dict::

    {"split": "test", "per_task": {"topic": 0.71, ...}, "average": 0.69, "n": 1800, "metric": {"topic": "accuracy"}}
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from searchmerge.bench.families import BenchModel
from searchmerge.bench.metrics import get_metric
from searchmerge.bench.pool import SPLITS, BenchSpecError, TaskPool


MAX_PREFIX_ENTRIES = 3  # distinct cached prefixes kept per task pool (base + a couple of others)


def task_features(model: BenchModel, taskpool: TaskPool, task: str, split: str) -> dict[str, np.ndarray]:
    """Preprocessed arrays for one task split (tokenised / normalised), computed once and cached."""
    from searchmerge.bench.families import get_family

    from searchmerge.bench.families import MAX_TOKENS
    from searchmerge.bench.features_cache import cached_preprocess

    key = (model.family, model.base_folder, task, split)
    cache = taskpool._features
    if key not in cache:
        cache[key] = cached_preprocess(get_family(model.family), taskpool.tasks[task], split, model.base_folder, MAX_TOKENS)
    return cache[key]


def model_features(model: BenchModel, taskpool: TaskPool, tasks: Sequence[str], split: str) -> tuple[dict[str, dict[str, np.ndarray]], str]:
    """The arrays the model's runner consumes, per task, and a cache key for them.

    With ``prefix_layers`` set (seqcls), the output of the model's frozen prefix is cached per hash of the
    prefix weights: every model sharing the prefix (e.g. the base, fine-tuned-above-layer-k models and
    their delta merges) reuses it and runs only the top layers.
    """
    from searchmerge.bench.families import get_family

    base = {t: task_features(model, taskpool, t, split) for t in tasks}
    ph = model.prefix_hash()
    if ph is None:
        return base, "plain"
    fam = get_family(model.family)
    cache = taskpool._features
    order: list[str] = cache.setdefault(("prefix-order",), [])  # type: ignore[arg-type]
    module = None
    out = {}
    for t in tasks:
        key = (model.family, model.base_folder, t, split, "prefix", model.prefix_layers, ph)
        if key not in cache:
            if module is None:
                module = model.runner().module
            cache[key] = fam.prefix_features(module, base[t], int(model.prefix_layers))  # type: ignore[arg-type]
        out[t] = cache[key]
    if ph in order:
        order.remove(ph)
    order.append(ph)
    while len(order) > MAX_PREFIX_ENTRIES:
        old = order.pop(0)
        for k in [k for k in cache if len(k) == 7 and k[-1] == old]:
            del cache[k]
    return out, ph


class _Scorer:
    """Collects predictions by (task, index) and reports running / final metrics."""

    def __init__(self, taskpool: TaskPool, split: str, tasks: Sequence[str]) -> None:
        self.tp, self.split, self.tasks = taskpool, split, list(tasks)
        self.preds = {t: np.full(len(taskpool.tasks[t].splits[split]), -1, np.int64) for t in self.tasks}
        self.done = {t: np.zeros(len(self.preds[t]), bool) for t in self.tasks}

    def add(self, task: str, idx: np.ndarray, preds: np.ndarray) -> None:
        self.preds[task][idx] = preds
        self.done[task][idx] = True

    def report(self, final: bool = False) -> dict[str, Any]:
        per_task = {}
        for t in self.tasks:
            d = self.done[t]
            if d.any():
                spec = self.tp.tasks[t].spec
                per_task[t] = get_metric(spec.metric)(self.preds[t][d], self.tp.tasks[t].splits[self.split].labels[d])
        n_done = int(sum(d.sum() for d in self.done.values()))
        total = int(sum(len(d) for d in self.done.values()))
        out: dict[str, Any] = {
            "split": self.split,
            "per_task": per_task,
            "average": float(np.mean(list(per_task.values()))) if per_task else 0.0,
            "n": n_done,
        }
        if final:
            out["metric"] = {t: self.tp.tasks[t].spec.metric for t in self.tasks}
        else:
            out["total"] = total
            out["tasks_done"] = [t for t in self.tasks if self.done[t].all()]
        return out


def _check(taskpool: TaskPool, split: str, tasks: Sequence[str] | None) -> list[str]:
    if split not in SPLITS:
        raise BenchSpecError(f"unknown split {split!r}; splits: {list(SPLITS)}")
    tasks = list(tasks) if tasks is not None else taskpool.names
    unknown = [t for t in tasks if t not in taskpool.tasks]
    if unknown:
        raise BenchSpecError(f"unknown task(s) {unknown}; tasks: {taskpool.names}")
    return tasks


def iter_evaluate(
    model: BenchModel,
    taskpool: TaskPool,
    split: str = "test",
    *,
    tasks: Sequence[str] | None = None,
    backend: str = "local",
    batch_size: int = 64,
    num_actors: int = 2,
    num_threads: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Iterator[dict[str, Any]]:
    """Yield running metrics after each chunk; the last item is the final result (with ``"metric"``).

    ``device`` (``cpu``, ``cuda``, ``cuda:1``): where the evaluation model runs (Ray actors then ask for a GPU)."""
    tasks = _check(taskpool, split, tasks)
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    feats_all, _ = model_features(model, taskpool, tasks, split)  # once (cached), before model work
    evaluator = evaluator_for(model, feats_all, tasks, backend, batch_size=batch_size, seed=seed,
                              num_actors=num_actors, num_threads=num_threads, device=device)
    evaluator.load(model.backbone)
    scorer = _Scorer(taskpool, split, tasks)
    for t, idx, pred in evaluator.iter_chunks():
        scorer.add(t, idx, pred)
        yield scorer.report()
    yield scorer.report(final=True)


def evaluator_for(model: BenchModel, features: dict[str, dict[str, np.ndarray]], tasks: Sequence[str],
                  backend: str = "local", *, batch_size: int = 64, seed: int = 0, num_actors: int = 2,
                  num_threads: int | None = None, device: str = "cpu") -> Any:
    """The long-lived evaluator for this model's shape on these features (built once, reused across calls).

    The key holds the feature arrays' identities; the evaluator keeps them alive, so an id is never reused."""
    from searchmerge.bench.evaluators import LocalEvaluator, RayEvaluator, cached_evaluator, model_shape_key

    key = (backend, model_shape_key(model), tuple(tasks), tuple(id(features[t]) for t in tasks), batch_size, seed,
           num_actors if backend == "ray" else 0, num_threads, device)
    if backend == "local":
        return cached_evaluator(key, lambda: LocalEvaluator(model, features, tasks, batch_size, seed, num_threads, device))
    return cached_evaluator(key, lambda: RayEvaluator(model, features, tasks, batch_size, seed, num_actors,
                                                      num_threads or 1, device=device), ray_backed=True)


def evaluate(model: BenchModel, taskpool: TaskPool, split: str = "test", **kwargs: Any) -> dict[str, Any]:
    """Per-task metrics and their average on ``split`` (a plain dict); kwargs as :func:`iter_evaluate`."""
    result: dict[str, Any] = {}
    for result in iter_evaluate(model, taskpool, split, **kwargs):
        pass
    return result
