"""The Ray Data evaluation path gives exactly the in-process metrics (fixture zoo)."""

from __future__ import annotations

import pytest

from searchmerge.bench import evaluate, iter_evaluate


@pytest.mark.timeout(240)
def test_ray_path_equals_local_path(ray_session, fixture_bench):
    mp, tp = fixture_bench.modelpool, fixture_bench.taskpool
    ft = mp.model(mp.finetuned["prime"])
    for model in (mp.model(), ft):
        local = evaluate(model, tp, "test", batch_size=64)
        remote = evaluate(model, tp, "test", backend="ray", batch_size=64, num_actors=2)
        assert remote == local
    # chunked reports: a search can stop after the first partial result
    gen = iter_evaluate(ft, tp, "validation", backend="ray", batch_size=32, num_actors=1)
    first = next(gen)
    assert 0 < first["n"] < first["total"]
    gen.close()
    assert evaluate(ft, tp, "validation", backend="ray", batch_size=100, num_actors=1) == evaluate(ft, tp, "validation")
