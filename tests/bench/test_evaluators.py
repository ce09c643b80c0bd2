"""Long-lived evaluators: identical metrics on every path, weights loaded in place, features cached on disk by
what they depend on, partial results that add up to the final ones, the FLOP count of the bound."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from searchmerge.bench import evaluate, load_bench
from searchmerge.bench.chunks import plan_chunks, token_lengths
from searchmerge.bench.evaluate import evaluator_for, model_features
from searchmerge.bench.evaluators import LocalEvaluator, RayEvaluator, close_evaluators
from searchmerge.bench.features_cache import cached_preprocess, features_key
from searchmerge.bench.families import MAX_TOKENS, get_family
from searchmerge.bench.flops import split_flops
from tests.bench.test_families import tiny_bert  # noqa: F401  (module fixture)


def _ta(bench, lam):
    mp = bench.modelpool
    sd = {k: v + lam * sum(ft[k] - v for ft in mp.finetuned.values()) for k, v in mp.base.items()}
    return mp.model(sd)


@pytest.mark.timeout(240)
def test_one_ray_evaluator_serves_many_candidates(ray_session, fixture_bench):
    """Two candidates in turn on the same actors (weights copied in place) give the in-process metrics."""
    tp = fixture_bench.taskpool
    a, b = _ta(fixture_bench, 0.3), _ta(fixture_bench, 1.0)
    local = [evaluate(m, tp, "validation", batch_size=16) for m in (a, b)]
    assert local[0] != local[1]
    feats, _ = model_features(a, tp, tp.names, "validation")
    ev = evaluator_for(a, feats, tp.names, "ray", batch_size=16, num_actors=2)
    for m, want in zip((a, b, a), local + local[:1]):
        assert evaluate(m, tp, "validation", backend="ray", batch_size=16, num_actors=2) == want
        assert evaluator_for(m, feats, tp.names, "ray", batch_size=16, num_actors=2) is ev  # kept, not rebuilt
    busy = ev.busy_seconds()
    assert len(busy) == 2 and all(s > 0 for s in busy)  # both actors did work
    close_evaluators()
    assert ev.actors == []


def test_local_evaluator_loads_in_place(fixture_bench):
    tp = fixture_bench.taskpool
    a, b = _ta(fixture_bench, 0.3), _ta(fixture_bench, 1.0)
    feats, _ = model_features(a, tp, tp.names, "test")
    ev = LocalEvaluator(a, feats, tp.names, batch_size=32)
    storage = [p.data_ptr() for p in ev.runner.module.parameters()]
    ev.load(b.backbone)
    assert [p.data_ptr() for p in ev.runner.module.parameters()] == storage
    got = {k: v for k, v in ev.runner.module.state_dict().items()}
    assert all(torch.equal(got[k], b.backbone[k]) for k in got)
    with pytest.raises(ValueError, match="does not fit"):
        ev.load({k: v for k, v in list(b.backbone.items())[1:]})


def test_partial_results_add_up_to_the_final_ones(fixture_bench):
    """Per chunk correct counts sum to the final per-task accuracy; the plan interleaves tasks, reproducibly."""
    tp = fixture_bench.taskpool
    m = _ta(fixture_bench, 0.5)
    feats, _ = model_features(m, tp, tp.names, "test")
    ev = LocalEvaluator(m, feats, tp.names, batch_size=20, seed=3)
    correct = {t: 0 for t in tp.names}
    for t, idx, pred in ev.iter_chunks():
        correct[t] += int((pred == tp.tasks[t].splits["test"].labels[idx]).sum())
    final = evaluate(m, tp, "test", batch_size=20, seed=3)
    for t in tp.names:
        assert correct[t] / len(tp.tasks[t].splits["test"]) == pytest.approx(final["per_task"][t], abs=1e-12)
    order = [t for t, _ in ev.plan.chunks]
    assert len(set(order[: len(tp.names) * 2])) > 1  # not task by task
    assert [(t, i.tolist()) for t, i in ev.plan.chunks] == [
        (t, i.tolist()) for t, i in LocalEvaluator(m, feats, tp.names, batch_size=20, seed=3).plan.chunks]


def test_features_cache_is_keyed_by_what_it_depends_on(tiny_bert, tmp_path, monkeypatch):  # noqa: F811
    b = load_bench(tiny_bert)
    fam, task = get_family(b.modelpool.model().family), b.taskpool.tasks["sent"]
    base = b.modelpool.model().base_folder
    key = features_key(fam, base, task.splits["test"], MAX_TOKENS)
    assert key == features_key(fam, base, task.splits["test"], MAX_TOKENS)
    assert key != features_key(fam, base, task.splits["test"], MAX_TOKENS // 2)  # max length
    assert key != features_key(fam, base, task.splits["train"], MAX_TOKENS)  # data contents
    copy = tmp_path / "base_copy"
    shutil.copytree(base, copy)
    assert features_key(fam, copy, task.splits["test"], MAX_TOKENS) == key  # contents, not paths
    with open(copy / "vocab.txt", "a") as f:
        f.write("zebra\n")
    assert features_key(fam, copy, task.splits["test"], MAX_TOKENS) != key  # tokenizer files

    calls = []
    real = type(fam).preprocess
    monkeypatch.setattr(type(fam), "preprocess", lambda self, *a: calls.append(a) or real(self, *a))
    cache = tmp_path / "cache"
    first = cached_preprocess(fam, task, "test", base, MAX_TOKENS, cache)
    again = cached_preprocess(fam, task, "test", base, MAX_TOKENS, cache)
    assert len(calls) == 1 and list((cache / "features").glob("*.npz"))  # computed once, then read from disk
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_flops_of_the_bound_match_a_hand_count(tiny_bert):  # noqa: F811
    """BERT forward FLOPs per example at its real length: 2 flops per MAC over every matmul, attention included."""
    b = load_bench(tiny_bert)
    m = b.modelpool.model(b.modelpool.finetuned["sent"])
    tp = b.taskpool
    feats, _ = model_features(m, tp, ["sent"], "test")
    runner = m.runner()
    got = split_flops(runner.predict, feats, ["sent"])["sent"]
    h, inter, layers, classes = 32, 64, 2, 2
    want = 0
    for n in feats["sent"]["attention_mask"].sum(1).tolist():
        per_layer = 2 * n * (4 * h * h + 2 * h * inter) + 2 * 2 * n * n * h  # projections + QK^T and AV
        want += layers * per_layer
    want += len(feats["sent"]["attention_mask"]) * (2 * h * h + 2 * h * classes)  # pooler (run, unused) + head
    assert got == want


def test_length_bucketed_plan_pads_less(tiny_bert):  # noqa: F811
    b = load_bench(tiny_bert)
    m, tp = b.modelpool.model(), b.taskpool
    feats, _ = model_features(m, tp, tp.names, "test")
    lengths = token_lengths(feats)
    sizes = {t: len(lengths[t]) for t in tp.names}
    padded = {name: sum(len(i) * int(lengths[t][i].max()) for t, i in plan)
              for name, plan in (("bucketed", plan_chunks(sizes, 8, 0, lengths)), ("random", plan_chunks(sizes, 8, 0)))}
    assert padded["bucketed"] <= padded["random"]


def test_ray_evaluator_refuses_what_the_cluster_cannot_grant(ray_session, fixture_bench):
    from searchmerge.errors import SearchmergeError

    m, tp = fixture_bench.modelpool.model(), fixture_bench.taskpool
    feats, _ = model_features(m, tp, tp.names, "test")
    with pytest.raises(SearchmergeError, match="needs num_actors 5"):
        RayEvaluator(m, feats, tp.names, num_actors=5)


def test_task_model_runner_moves_its_heads(tmp_path):
    """``.to()`` on a task-model runner (what the store does to put it on its GPU) moves every head with the base."""
    from tests.bench.test_task_models import _pool

    path, _ = _pool(tmp_path, "bert")
    runner = load_bench(path).modelpool.model().runner()
    runner.module.to(torch.float64)
    for m in runner.module._tasks.values():
        assert all(p.dtype == torch.float64 for p in m.parameters())
