"""``search(spec, out)``: set up the bench, the resident replicas and Tune; run; re-evaluate on the report split."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from searchmerge.bench.evaluators import close_evaluators, free_cpus
from searchmerge.cluster.connect import check_run_folder, connect, is_job_server, resolve_address
from searchmerge.cluster.placement import driver_node, ensure_capacity, replica_nodes
from searchmerge.io.remote import is_uri
from searchmerge.search.driver import TUNE_DIR, Coordinator, _trial, grid_space, make_searcher
from searchmerge.search.evaluation import (
    build_eval_module, exact_model, mean_task_vector_norm, plan_chunks, split_features, split_only, token_lengths,
)
from searchmerge.search.fusion import FusionSource, is_fusion
from searchmerge.search.progress import ProgressView
from searchmerge.search.report import TrialRecorder, finish_run, read_trials
from searchmerge.search.space import build_space
from searchmerge.search.spec import STAT_METRICS, SearchSpec, SearchSpecError, read_search_spec


@dataclass
class SearchResult:
    out: Path
    summary: dict[str, Any]
    trials: Any = field(repr=False, default=None)  # pandas DataFrame of trials.parquet

    @property
    def best_recipe_yaml(self) -> str | None:
        return self.summary.get("best", {}).get("recipe_yaml")


def _check_out(out: Path, resume: bool, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (resume or force):
        raise SearchSpecError(f"--out {out} exists and is not empty; pass --resume to continue it or --force to start over")
    if resume and not (out / TUNE_DIR).exists():
        raise SearchSpecError(f"--resume: {out} holds no search to resume ({out / TUNE_DIR} not found)")
    parent = out.resolve().parent
    while not parent.exists():  # created with parents: the nearest existing folder must be writable
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise SearchSpecError(f"--out {out}: {parent} is not a writable folder; choose another --out")


def search(spec: SearchSpec | str | Path, out: str | Path = "runs/search", *, resume: bool = False,
           force: bool = False, progress: bool = True, address: str | None = None) -> SearchResult:
    """Run the search ``spec`` into the run folder ``out`` (``resume`` continues an interrupted one).

    ``address`` (else ``RAY_ADDRESS``): the Ray cluster to run on (``auto``, ``ray://…``, ``HOST:6379``);
    without one a local Ray is started on loopback.

    ``force`` replaces a non-empty ``out``: the old folder is moved aside and deleted only once the new
    search has finished (an interrupted new one stays in ``out``, resumable, and the old one is kept)."""
    from searchmerge.io.outdir import fresh_dir

    if not isinstance(spec, SearchSpec):
        spec = read_search_spec(spec)
    out = check_run_folder(out)  # a URI comes back checked (before any work) and normalized
    if is_uri(out):
        return _search_uri(spec, out, resume=resume, force=force, progress=progress, address=address)
    out = Path(out)
    _check_out(out, resume, force)
    address = resolve_address(address)
    if is_job_server(address):
        raise SearchSpecError(f"address {address} is a job server: submit with `searchmerge search SPEC --address {address}`")
    if force and not resume and out.exists() and any(out.iterdir()):
        with fresh_dir(out, force=True, on_failure="keep"):
            return _search(spec, out, resume=False, progress=progress, address=address)
    return _search(spec, out, resume=resume, progress=progress, address=address)


def _search_uri(spec: SearchSpec, uri: str, *, resume: bool, force: bool, progress: bool,
                address: str | None) -> SearchResult:
    """``--out URI``: the search runs in a local staging folder (``SearchResult.out``) mirrored to ``uri``: the
    live files after every trial, everything at the end (:mod:`searchmerge.io.remote`). ``resume`` pulls ``uri``
    first; ``force`` leaves the old run at ``uri`` whole until the new search has finished, then replaces it."""
    import contextlib
    import json
    import sys

    from searchmerge.io import remote
    from searchmerge.io.writer import atomic_write_text

    address = resolve_address(address)
    if is_job_server(address):
        raise SearchSpecError(f"address {address} is a job server: submit with `searchmerge search SPEC --address {address}`")
    if address and address.startswith("ray://"):
        raise SearchSpecError(f"--out {uri} with --address {address}: under Ray Client, Tune runs on the head, away from "
                              "the staging folder — submit it as a job (--address http://HEAD:8265) or run it on the head")
    had_run = remote.exists(uri)
    if had_run and not (resume or force):
        raise SearchSpecError(f"--out {uri} exists and is not empty; pass --resume to continue it or --force to start over")
    if resume and not remote.exists(uri, TUNE_DIR):
        raise SearchSpecError(f"--resume: {uri} holds no search to resume ({uri}/{TUNE_DIR} not found)")
    local = remote.staging_dir(uri)
    if resume:
        remote.pull(uri, local)
    else:
        remote.clear(local)
    deferred = force and had_run and not resume  # the old run stays whole until the new one has finished
    key = str(local.resolve())
    if not deferred:
        remote.MIRRORS[key] = uri  # TrialRecorder.flush pushes the live files after every trial
    try:
        result = _search(spec, local, resume=resume, progress=progress, address=address)
    except BaseException:
        if deferred:
            print(f"searchmerge: {uri} is unchanged; the interrupted new search is in {local}", file=sys.stderr)
        else:
            with contextlib.suppress(Exception):
                remote.push(local, uri)  # all there is (Tune's trial folders too): --resume continues from it
        raise
    finally:
        remote.MIRRORS.pop(key, None)
    plots = [Path(p) for p in result.summary.get("plots", [])]
    result.summary["plots"] = [f"{uri}/{p.relative_to(local).as_posix()}" if p.is_relative_to(local) else str(p) for p in plots]
    atomic_write_text(local / "summary.json", json.dumps(result.summary, indent=2, default=float))
    remote.push(local, uri)
    if deferred:
        remote.prune(local, uri)  # what the old run had and the new one has not
    return result


def _search(spec: SearchSpec, out: Path, *, resume: bool, progress: bool, address: str | None) -> SearchResult:
    from searchmerge.bench import load_bench
    from searchmerge.bench.zoo import ZOO_NAMES, build_zoo

    bench_path = spec.bench_path()
    bench_file = build_zoo(bench_path, progress=progress) if bench_path in ZOO_NAMES else bench_path
    bench = load_bench(bench_file)
    tasks = bench.taskpool.names
    space = build_space(spec, tasks)  # the real task names: per-model dimensions
    space = dataclasses.replace(space, data_bench=str(Path(bench_file).resolve()))  # what data recipes name
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(spec.to_yaml())

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # Tune's own state at most ~1 s behind trials.parquet
    import ray
    from ray import tune

    connect(address, num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed(spec))))
    if address:  # a cluster: an autoscaling one may have to start the worker nodes first
        ensure_capacity(spec.concurrency, spec.cpus_per_replica + 0.01, gpu=spec.device == "cuda")
    close_evaluators(ray_only=True)  # an earlier evaluate(backend='ray') keeps actors (and their CPUs) alive
    check_cpus(spec, free_cpus(cpus_needed(spec)))
    from searchmerge.store import TaskVectorStore

    mp = bench.modelpool
    stats = any(o.metric in STAT_METRICS for o in spec.objectives)
    tv_norm = mean_task_vector_norm(mp.base, [mp.finetuned[t] for t in tasks]) if stats else 1.0
    builder = functools.partial(build_eval_module, exact_model(bench), spec.num_threads, stats, tv_norm)
    replicas = []
    for node in replica_nodes(spec.concurrency, spec.cpus_per_replica, prefer_gpu=spec.device != "cpu"):
        store = TaskVectorStore.build(mp.base, [mp.finetuned[t] for t in tasks], names=tasks, num_actors=1,
                                      threads_per_actor=spec.num_threads, cpus_per_actor=spec.cpus_per_replica,
                                      device=spec.device, node_id=node, cache_fraction=spec.cache_fraction)
        replicas.append((store, store.attach_evaluator(builder)))
    fusion = FusionSource.put(bench, spec.report_split) if any(is_fusion(m) for m in space.methods) else None
    features = split_features(bench, spec.search_split, tasks)
    sizes = {t: len(bench.taskpool.tasks[t].splits[spec.search_split]) for t in tasks}
    chunks = plan_chunks(sizes, spec.eval_batch_size, spec.seed, token_lengths(features))
    total = sum(sizes.values())

    prior = read_trials(out)
    known = {r["recipe_key"]: {k: r[k] for k in r if k in _metric_keys(tasks)} | {"examples": r["examples"], "complete": True}
             for r in prior if r.get("status") == "done" and not r.get("duplicate")}
    coord_name = f"searchmerge-coordinator-{os.getpid()}-{int(time.time() * 1e3)}"
    coord = ray.remote(num_cpus=0)(Coordinator).options(name=coord_name, scheduling_strategy=driver_node()).remote(
        spec.concurrency, known)  # beside the driver: a lost worker node must not take the search's state with it
    ctx = {"space": space, "coord": coord, "replicas": replicas, "features": features, "chunks": chunks,
           "total": total, "taskpool": split_only(bench.taskpool, spec.search_split), "split": spec.search_split, "seed": spec.seed,
           "report_partial": len(spec.objectives) == 1, "stats": stats,
           "store_retries": spec.store_retries, "fusion": fusion}
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"cpu": TRIAL_CPUS})
    recorder = TrialRecorder(out, spec, prior)
    view = ProgressView(spec, prior_done=len(prior), best=_best_so_far(prior, spec), enabled=progress)
    stopper = _FailureStopper(coord_name, spec.max_failures)
    t_start = time.time()
    if resume and tune.Tuner.can_restore(str((out / TUNE_DIR).resolve())):
        tuner = tune.Tuner.restore(str((out / TUNE_DIR).resolve()), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = _new_tuner(spec, space, trainable, [recorder, view], stopper, out, total)
    try:
        grid = tuner.fit()
        recorder.reconcile(grid)
    finally:
        recorder.flush()
    summary = finish_run(out, spec, bench, space, replicas, t_start, fusion=fusion)
    for store, _ in replicas:
        store.close()
    ray.kill(coord)
    import pandas as pd

    return SearchResult(out, summary, pd.read_parquet(out / "trials.parquet"))


TRIAL_CPUS = 0.01  # a trial process mostly waits on its replica's actor: a token reservation


def cpus_needed(spec: SearchSpec) -> float:
    """Logical CPUs a search reserves: each replica (store + evaluator) and each concurrent trial process."""
    return spec.concurrency * (spec.cpus_per_replica + TRIAL_CPUS)


def check_cpus(spec: SearchSpec, available: float) -> None:
    """Refuse, before any work, a search whose reservations cannot all be granted (Tune would wait forever)."""
    need = cpus_needed(spec)
    if need > available + 1e-9:
        fit = max(0.0, available / spec.concurrency - TRIAL_CPUS)
        raise SearchSpecError(
            f"concurrency {spec.concurrency} x cpus_per_replica {spec.cpus_per_replica:g} (+{TRIAL_CPUS} per trial) needs "
            f"{need:g} CPUs but Ray has {available:g} free; set cpus_per_replica <= {fit:.2f} (threads are set by "
            "num_threads, not by the reservation) or lower concurrency")


def _metric_keys(tasks: list[str]) -> set[str]:
    return {"average", "worst", *STAT_METRICS, *[f"task_{t}" for t in tasks]}


from ray.tune import Stopper  # noqa: E402 - the run module always runs Tune


class _FailureStopper(Stopper):
    """Stops the whole search once more than ``max_failures`` trials failed."""

    def __init__(self, coord_name: str, max_failures: int) -> None:
        self.coord_name, self.max_failures, self.n = coord_name, max_failures, 0  # a name: Tune pickles stoppers

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        import ray

        self.n += 1
        if self.n % 5:
            return False
        try:
            coord = ray.get_actor(self.coord_name)
        except ValueError:  # a restored search: its coordinator has a new name
            return False
        return ray.get(coord.failure_count.remote()) > self.max_failures


def _best_so_far(rows: list[dict[str, Any]], spec: SearchSpec) -> float | None:
    """The best objective value among finished trials (single objective), for a resumed search's view."""
    o = spec.objectives[0]
    vals = [float(r[o.key]) for r in rows if r.get("status") == "done" and r.get(o.key) is not None]
    if len(spec.objectives) > 1 or not vals:
        return None
    return max(vals) if o.mode == "max" else min(vals)


def _new_tuner(spec: SearchSpec, space: Any, trainable: Any, callbacks: list[Any], stopper: Any, out: Path, total: int):  # noqa: ANN202
    from ray import tune

    points = [space.point(p) for p in spec.points_to_evaluate]
    single = len(spec.objectives) == 1
    scheduler = None
    if spec.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="examples", max_t=total, grace_period=max(1, int(spec.scheduler.grace_fraction * total)),
                                  reduction_factor=spec.scheduler.reduction_factor)
    param_space = space.tune_space()
    n = spec.budget.trials if spec.budget.trials is not None else -1
    if spec.searcher == "grid":
        param_space, n = grid_space(space), 1
    if space.is_fixed:  # one method, nothing searched: a fixed recipe is one trial, whatever the budget or searcher
        from ray.tune.search import BasicVariantGenerator

        param_space, n, alg = {}, 1, BasicVariantGenerator(max_concurrent=1)
    else:
        alg = make_searcher(spec, space, points)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=alg, scheduler=scheduler, num_samples=n, time_budget_s=spec.budget.seconds, reuse_actors=True,
            # concurrency is the searcher's own limit (ConcurrencyLimiter / BasicVariantGenerator(max_concurrent))
            metric=spec.objectives[0].key if single else None, mode=spec.objectives[0].mode if single else None,
        ),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(out.resolve()), callbacks=callbacks, verbose=0,
                                  stop=stopper, failure_config=tune.FailureConfig(max_failures=spec.trial_retries)),
    )
