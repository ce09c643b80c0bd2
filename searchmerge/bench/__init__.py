"""The benchmark layer (FusionBench-style): model pools, task pools, evaluation, zoos, leaderboard."""

from searchmerge.bench.evaluate import evaluate, iter_evaluate
from searchmerge.bench.families import BenchModel, get_family
from searchmerge.bench.metrics import get_metric, register_metric
from searchmerge.bench.pool import (
    Bench, BenchSpec, BenchSpecError, ModelPool, ModelPoolSpec, TaskPool, TaskPoolSpec, TaskSpec,
    load_bench, load_modelpool, load_taskpool, read_bench_spec,
)

__all__ = [
    "Bench", "BenchModel", "BenchSpec", "BenchSpecError", "ModelPool", "ModelPoolSpec", "TaskPool",
    "TaskPoolSpec", "TaskSpec", "evaluate", "get_family", "get_metric", "iter_evaluate", "load_bench",
    "load_modelpool", "load_taskpool", "read_bench_spec", "register_metric",
]
