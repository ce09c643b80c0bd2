"""Evaluate a :class:`BenchModel` on a task pool: in-process, or on a Ray Data actor pool; same metrics.

Both paths run the very same :class:`~searchmerge.bench.families.Runner` on the very same preprocessed
arrays (tokenised / normalised once per task pool, family, base folder and split, then cached), in
chunks of ``batch_size`` examples, and put each prediction back at its (task, index) before scoring.
:func:`iter_evaluate` yields partial metrics after every chunk, so a search can drop a weak candidate
early; :func:`evaluate` returns the final plain dict::

    {"split": "test", "per_task": {"topic": 0.71, ...}, "average": 0.69, "n": 1800, "metric": {"topic": "accuracy"}}
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from searchmerge.bench.families import BenchModel, Runner
from searchmerge.bench.metrics import get_metric
from searchmerge.bench.pool import SPLITS, BenchSpecError, TaskPool


MAX_PREFIX_ENTRIES = 3  # distinct cached prefixes kept per task pool (base + a couple of others)


def task_features(model: BenchModel, taskpool: TaskPool, task: str, split: str) -> dict[str, np.ndarray]:
    """Preprocessed arrays for one task split (tokenised / normalised), computed once and cached."""
    from searchmerge.bench.families import get_family

    key = (model.family, model.base_folder, task, split)
    cache = taskpool._features
    if key not in cache:
        cache[key] = get_family(model.family).preprocess(taskpool.tasks[task], split, model.base_folder)
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


def _chunks(taskpool: TaskPool, split: str, tasks: Sequence[str], batch_size: int) -> list[tuple[str, int, int]]:
    out = []
    for t in tasks:
        n = len(taskpool.tasks[t].splits[split])
        out += [(t, s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    return out


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
) -> Iterator[dict[str, Any]]:
    """Yield running metrics after each chunk; the last item is the final result (with ``"metric"``)."""
    tasks = _check(taskpool, split, tasks)
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    feats_all, feats_key = model_features(model, taskpool, tasks, split)  # once (cached), before model work
    chunks = _chunks(taskpool, split, tasks, batch_size)
    scorer = _Scorer(taskpool, split, tasks)
    if backend == "local":
        runner = model.runner()
        for t, s, e in chunks:
            feats = feats_all[t]
            scorer.add(t, np.arange(s, e), runner.predict(t, {k: v[s:e] for k, v in feats.items()}))
            yield scorer.report()
    else:
        stream = _ray_stream(model, taskpool, split, tasks, chunks, num_actors, num_threads or 1, feats_all, feats_key)
        for batch in stream:
            for t_i, idx, pred in zip(batch["task"], batch["idx"], batch["pred"]):
                scorer.add(tasks[int(t_i)], np.asarray([idx]), np.asarray([pred]))
            yield scorer.report()
    yield scorer.report(final=True)


def evaluate(model: BenchModel, taskpool: TaskPool, split: str = "test", **kwargs: Any) -> dict[str, Any]:
    """Per-task metrics and their average on ``split`` (a plain dict); kwargs as :func:`iter_evaluate`."""
    result: dict[str, Any] = {}
    for result in iter_evaluate(model, taskpool, split, **kwargs):
        pass
    return result


# --- Ray Data path ------------------------------------------------------------------------------------


class RayPredictor:
    """``map_batches`` callable class: each actor builds the model once, holds the cached features."""

    def __init__(self, model: Any, features: Any, tasks: list[str], num_threads: int = 1) -> None:
        import ray

        torch.set_num_threads(num_threads)
        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        if isinstance(features, ray.ObjectRef):
            features = ray.get(features)
        self.runner: Runner = model.runner()
        self.features = features
        self.tasks = tasks

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out_t, out_i, out_p = [], [], []
        for t_i, s, e in zip(batch["task"], batch["start"], batch["stop"]):
            t, s, e = self.tasks[int(t_i)], int(s), int(e)
            feats = self.features[t]
            out_p.append(self.runner.predict(t, {k: v[s:e] for k, v in feats.items()}))
            out_i.append(np.arange(s, e, dtype=np.int64))
            out_t.append(np.full(e - s, int(t_i), np.int64))
        return {"task": np.concatenate(out_t), "idx": np.concatenate(out_i), "pred": np.concatenate(out_p)}


_FEATURE_REFS: dict[tuple[Any, ...], Any] = {}


def _features_ref(model: BenchModel, taskpool: TaskPool, split: str, tasks: list[str],
                   feats: dict[str, dict[str, np.ndarray]], feats_key: str):  # noqa: ANN202
    """The cached features of these tasks, put in the object store once per Ray session."""
    import ray

    session = ray.get_runtime_context().get_job_id()
    key = (session, id(taskpool._features), model.family, model.base_folder, split, tuple(tasks), feats_key)
    if key not in _FEATURE_REFS:
        if len(_FEATURE_REFS) >= 8:  # keep the object store bounded
            _FEATURE_REFS.pop(next(iter(_FEATURE_REFS)))
        _FEATURE_REFS[key] = ray.put(feats)
    return _FEATURE_REFS[key]


def _ray_stream(
    model: BenchModel, taskpool: TaskPool, split: str, tasks: list[str],
    chunks: list[tuple[str, int, int]], num_actors: int, num_threads: int,
    feats: dict[str, dict[str, np.ndarray]], feats_key: str,
) -> Iterator[dict[str, np.ndarray]]:
    import ray
    import ray.data

    if not ray.is_initialized():
        raise RuntimeError("the Ray backend needs ray.init() first (tests: use the `ray_session` fixture).")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    t_index = {t: i for i, t in enumerate(tasks)}
    items = [{"task": t_index[t], "start": s, "stop": e} for t, s, e in chunks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * num_actors)))
    out = ds.map_batches(
        RayPredictor,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=1,
        batch_format="numpy",
        fn_constructor_kwargs={
            "model": ray.put(model),
            "features": _features_ref(model, taskpool, split, tasks, feats, feats_key),
            "tasks": tasks,
            "num_threads": num_threads,
        },
        num_cpus=1,
    )
    yield from out.iter_batches(batch_size=None, batch_format="numpy")
