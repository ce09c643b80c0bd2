"""The Ray Data evaluation path gives exactly the in-process metrics (fixture zoo)."""

from __future__ import annotations

import pytest

from searchmerge.bench import evaluate, iter_evaluate


@pytest.mark.timeout(240)
def test_ray_path_equals_local_path(ray_session, fixture_bench):
    mp, tp = fixture_bench.modelpool, fixture_bench.taskpool
    ft = mp.model(mp.finetuned["prime"])
    local = evaluate(ft, tp, "test", batch_size=50)
    remote = evaluate(ft, tp, "test", backend="ray", batch_size=50, num_actors=2)
    assert remote == local and set(remote["per_task"]) == set(tp.names)
    # chunked reports: a search can stop after the first partial result
    gen = iter_evaluate(ft, tp, "validation", backend="ray", batch_size=32, num_actors=1)
    first = next(gen)
    assert 0 < first["n"] < first["total"]
    gen.close()


from tests.bench.test_families import tiny_bert  # noqa: E402,F401  (module fixture)


@pytest.mark.timeout(240)
def test_ray_path_equals_local_seqcls_prefix_cache(ray_session, tiny_bert):  # noqa: F811
    import yaml

    from searchmerge.bench import load_bench
    from searchmerge.bench.pool import parse_bench_spec

    spec = yaml.safe_load(tiny_bert.read_text())
    spec["modelpool"]["cache_prefix_layers"] = 1
    b = load_bench(parse_bench_spec(spec))
    model = b.modelpool.model(b.modelpool.finetuned["topic"])
    local = evaluate(model, b.taskpool, "test", batch_size=16)
    assert evaluate(model, b.taskpool, "test", backend="ray", batch_size=16, num_actors=1) == local
