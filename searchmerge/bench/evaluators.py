"""Long-lived evaluators: the model is built once, its features cached once, and a new candidate's weights are
copied **in place** into it — a search evaluates thousands of candidates, so nothing per call may rebuild.

* :class:`LocalEvaluator` runs the chunks in this process.
* :class:`RayEvaluator` keeps ``num_actors`` Ray actors alive across calls, each holding the built model and
  the split's features (fetched once from the object store); Ray Data streams the chunk plan to them
  (``map_batches`` with a small task pool that forwards each chunk to its actor), and results stream back as
  chunks finish, so a caller can stop a weak candidate early. A new candidate's weights go into the object
  store once per call (numpy, read zero-copy by every actor on the node) and are copied in place.

Both run the same :func:`~searchmerge.bench.chunks.plan_chunks` plan on the same arrays, so their per-task
metrics are identical, and both accept ``load(backbone)`` alone so a resident model is evaluated without
shipping anything (the search's trials go further and evaluate inside the store actor that merged them)."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from searchmerge.bench.chunks import Chunk, chunk_features, plan_chunks, token_lengths
from searchmerge.bench.families import BenchModel
from searchmerge.errors import SearchmergeError


def model_shape_key(model: BenchModel) -> str:
    """What a built evaluation model depends on besides its backbone values: family, configs, heads, folder."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([model.family, model.base_folder, model.config, model.task_configs, model.prefix_layers],
                        sort_keys=True, default=str).encode())
    for t in sorted(model.heads):
        for k in sorted(model.heads[t]):
            v = model.heads[t][k].detach().cpu().contiguous()
            h.update(f"{t}.{k}{tuple(v.shape)}{v.dtype}".encode())
            h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    for k in sorted(model.backbone):  # names and shapes only: values are what load() changes
        h.update(f"{k}{tuple(model.backbone[k].shape)}{model.backbone[k].dtype}".encode())
    return h.hexdigest()


@torch.no_grad()
def load_in_place(module: torch.nn.Module, backbone: dict[str, Any]) -> None:
    """Copy a backbone (tensors or numpy arrays, same keys) into the built model's own storage."""
    own = module.state_dict()
    missing = [k for k in own if k not in backbone]
    if missing or len(own) != len(backbone):
        extra = [k for k in backbone if k not in own]
        raise ValueError(f"backbone does not fit the evaluation model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, dst in own.items():
        src = backbone[k]
        if isinstance(src, np.ndarray):  # read-only object-store memory: only read here
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                src = torch.from_numpy(src)
        dst.copy_(src)


class _Plan:
    """The split's chunk plan and features: computed once per evaluator."""

    def __init__(self, features: dict[str, dict[str, np.ndarray]], tasks: Sequence[str], batch_size: int, seed: int):
        sizes = {t: len(next(iter(features[t].values()))) for t in tasks}
        self.features, self.tasks = features, list(tasks)
        self.chunks: list[Chunk] = plan_chunks(sizes, batch_size, seed, token_lengths({t: features[t] for t in tasks}))


class LocalEvaluator:
    """The in-process evaluator: one built model, weights loaded in place per candidate."""

    def __init__(self, model: BenchModel, features: dict[str, dict[str, np.ndarray]], tasks: Sequence[str],
                 batch_size: int = 64, seed: int = 0, num_threads: int | None = None, device: str = "cpu") -> None:
        self.plan = _Plan(features, tasks, batch_size, seed)
        self.runner = model.runner()
        self.runner.module.to(device)  # the batches follow the model's device (Runner.predict)
        self.num_threads = num_threads

    def load(self, backbone: dict[str, Any]) -> None:
        load_in_place(self.runner.module, backbone)

    def iter_chunks(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """``(task, indices, predictions)`` per chunk, in plan order."""
        prev = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            for t, idx in self.plan.chunks:
                yield t, idx, self.runner.predict(t, chunk_features(self.plan.features, t, idx))
        finally:
            torch.set_num_threads(prev)


class EvalActor:
    """One long-lived evaluation actor: the built model and the split's features, kept across calls."""

    def __init__(self, model: Any, features: Any, chunks: list[Chunk], num_threads: int = 1,
                 device: str = "cpu") -> None:
        import ray

        torch.set_num_threads(num_threads)
        model = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        self.features = ray.get(features) if isinstance(features, ray.ObjectRef) else features
        self.runner = model.runner()
        self.runner.module.to(device)
        self.chunks = chunks
        self.busy_s = 0.0

    def load(self, backbone: Any) -> None:
        import ray

        load_in_place(self.runner.module, ray.get(backbone) if isinstance(backbone, ray.ObjectRef) else backbone)

    def predict(self, chunk: int) -> tuple[int, np.ndarray, np.ndarray]:
        import time

        t0 = time.perf_counter()
        t, idx = self.chunks[chunk]
        pred = self.runner.predict(t, chunk_features(self.features, t, idx))
        self.busy_s += time.perf_counter() - t0
        return chunk, idx, pred

    def take_busy(self) -> float:
        """Seconds spent in forward passes since the last call (the per-call overhead is the rest)."""
        out, self.busy_s = self.busy_s, 0.0
        return out


def forwarder():  # noqa: ANN201
    """The Ray Data task that hands each chunk to its actor and returns the predictions with their chunk ids.

    Built as a closure so cloudpickle ships it by value: the task workers then import only numpy and Ray,
    not torch and searchmerge (seconds per fresh worker on a small machine)."""

    def forward(batch, actors):  # noqa: ANN001, ANN202
        import numpy as np
        import ray

        refs = [actors[int(a)].predict.remote(int(c)) for c, a in zip(batch["chunk"], batch["actor"]) if c >= 0]
        chunk, idx, pred = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for c, i, p in ray.get(refs):
            chunk.append(np.full(len(i), c, np.int64))
            idx.append(np.asarray(i, np.int64))
            pred.append(np.asarray(p, np.int64))
        return {"chunk": np.concatenate(chunk), "idx": np.concatenate(idx), "pred": np.concatenate(pred)}

    return forward


def assign_actors(chunks: list[Chunk], costs: list[float], n: int) -> list[int]:
    """Each chunk to the actor with the least work so far, in plan order (balanced, still interleaved)."""
    load = [0.0] * n
    out = []
    for c in costs:
        a = int(np.argmin(load))
        load[a] += c
        out.append(a)
    return out


def free_cpus(need: float, wait_s: float = 5.0) -> float:
    """Ray's free CPUs, waiting up to ``wait_s`` for ``need``: killed actors hand theirs back a moment later."""
    import time

    import ray

    deadline = time.time() + wait_s
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free + 1e-9 >= need or time.time() > deadline:
            return free
        time.sleep(0.1)


class RayEvaluator:
    """``num_actors`` long-lived evaluation actors fed by Ray Data; see the module docstring."""

    def __init__(self, model: BenchModel, features: dict[str, dict[str, np.ndarray]], tasks: Sequence[str],
                 batch_size: int = 64, seed: int = 0, num_actors: int = 2, num_threads: int = 1,
                 num_cpus: float = 1.0, device: str = "cpu") -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("the Ray backend needs ray.init() first (tests: use the `ray_session` fixture).")
        need = num_actors * num_cpus
        if free_cpus(need) + 1e-9 < need:
            raise SearchmergeError(
                f"the Ray evaluator needs num_actors {num_actors} x {num_cpus:g} CPUs = {need:g} CPUs but Ray has "
                f"{free_cpus(0):g} free; lower num_actors, or close what holds them (close_evaluators())")
        self.plan = _Plan(features, tasks, batch_size, seed)
        lengths = token_lengths({t: features[t] for t in tasks})
        costs = [len(i) * (float(lengths[t][i].max()) if lengths else 1.0) for t, i in self.plan.chunks]
        self.assignment = assign_actors(self.plan.chunks, costs, num_actors)
        actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=1 if device.startswith("cuda") else 0)(EvalActor)
        model_ref, feats_ref = ray.put(model), ray.put({t: features[t] for t in tasks})
        self.actors = [actor_cls.remote(model_ref, feats_ref, self.plan.chunks, num_threads, device)
                       for _ in range(num_actors)]
        ray.get([a.take_busy.remote() for a in self.actors])  # built: the constructor cost is not a call's
        for _ in self._stream([{"chunk": -1, "actor": 0}] * num_actors):  # start Ray Data's task workers now
            pass

    def load(self, backbone: dict[str, Any]) -> None:
        """Ship a candidate's weights once (numpy in the object store) and copy them in place on every actor."""
        import ray

        ref = ray.put({k: v.detach().cpu().numpy() for k, v in backbone.items()})
        ray.get([a.load.remote(ref) for a in self.actors])

    def _stream(self, items: list[dict[str, int]]) -> Iterator[dict[str, np.ndarray]]:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        n = len(self.actors)
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * n)))
        out = ds.map_batches(forwarder(), fn_kwargs={"actors": self.actors}, batch_size=1, batch_format="numpy",
                             compute=ray.data.TaskPoolStrategy(size=n), num_cpus=0)
        yield from out.iter_batches(batch_size=None, batch_format="numpy")

    def iter_chunks(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """``(task, indices, predictions)`` per chunk as Ray Data returns them (completion order)."""
        items = [{"chunk": c, "actor": a} for c, a in enumerate(self.assignment)]
        for batch in self._stream(items):
            for c in np.unique(batch["chunk"]):
                sel = batch["chunk"] == c
                yield self.plan.chunks[int(c)][0], batch["idx"][sel], batch["pred"][sel]

    def busy_seconds(self) -> list[float]:
        import ray

        return ray.get([a.take_busy.remote() for a in self.actors])

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


_CACHE: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
MAX_CACHED_LOCAL = 2


def cached_evaluator(key: tuple[Any, ...], make: Any, ray_backed: bool = False) -> Any:
    """Evaluators kept across ``evaluate(...)`` calls, so repeated calls on one pool reuse their built models and
    actors: a small LRU of in-process ones, and at most **one** Ray-backed one (its actors hold cluster CPUs; a
    different one closes it first, and :func:`close_evaluators` releases it, e.g. before a search reserves CPUs)."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    if ray_backed:
        close_evaluators(ray_only=True)
    ev = _CACHE[key] = make()
    local = [k for k, v in _CACHE.items() if not isinstance(v, RayEvaluator)]
    for k in local[:max(0, len(local) - MAX_CACHED_LOCAL)]:
        del _CACHE[k]
    return ev


def close_evaluators(ray_only: bool = False) -> None:
    """Drop the kept evaluators (killing the Ray ones' actors, which hands their CPUs back)."""
    for k in list(_CACHE):
        if isinstance(_CACHE[k], RayEvaluator):
            _CACHE.pop(k).close()
        elif not ray_only:
            del _CACHE[k]
