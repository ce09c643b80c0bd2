"""The real zoos (slow; need `make zoo-deps`): they build, load, and show the merging effects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from searchmerge.bench import evaluate, load_bench
from searchmerge.bench.zoo import ZooUnavailable, build_zoo
from searchmerge.merge import merge
from searchmerge.recipe import Recipe

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _zoo(name: str):
    mod = __import__(f"searchmerge.bench.zoo.{name}", fromlist=["check_available"])
    try:
        mod.check_available()
    except ZooUnavailable as exc:
        pytest.skip(str(exc))
    return load_bench(build_zoo(name, progress=False))


def _effects(bench, lam_good: float, lam_bad: float = 1.0) -> dict[str, float]:
    mp, tp = bench.modelpool, bench.taskpool
    names = tp.names

    def ta(lam: float) -> float:
        r = Recipe(method="task_arithmetic", base_model="base", models=[{"model": n} for n in names],
                   parameters={"lambda": lam})
        sd = merge(r, base=mp.base, models=[mp.finetuned[n] for n in names])
        return evaluate(mp.model(sd), tp, "validation")["average"]

    return {
        "pretrained": evaluate(mp.model(), tp, "validation")["average"],
        "individual": float(np.mean([evaluate(mp.model(mp.finetuned[t]), tp, "validation", tasks=[t])["average"]
                                     for t in names])),
        "good": ta(lam_good),
        "bad": ta(lam_bad),
    }


@pytest.mark.parametrize("zoo, min_tasks, family", [("text", 6, "seqcls_task"), ("vision", 4, "image")])
def test_zoo_shows_merging_effects(zoo, min_tasks, family):
    bench = _zoo(zoo)
    assert len(bench.taskpool.names) >= min_tasks and bench.modelpool.spec.family == family
    r = _effects(bench, 0.3)
    assert r["pretrained"] < r["good"] < r["individual"]
    assert r["bad"] < r["good"]


def test_mobilenet_imagenet_weights_load_strict():
    from searchmerge.bench.zoo import vision

    try:
        vision.weights_path()
    except ZooUnavailable as exc:
        pytest.skip(str(exc))
    m = vision.load_imagenet_mobilenet()
    assert sum(p.numel() for p in m.parameters()) == 3_504_872


def test_text_zoo_is_fully_fine_tuned_and_self_contained():
    from searchmerge.bench.zoo.text import unchanged_tensors

    bench = _zoo("text")
    mp = bench.modelpool
    assert not Path(mp.spec.base).is_absolute()  # the base is the zoo's own copy, not a path into a venv
    for t, sd in mp.finetuned.items():
        assert unchanged_tensors(mp.base, sd) == [], t
