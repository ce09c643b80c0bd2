"""Ensembles equal hand-computed averages of the members' logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchmerge.bench import load_bench
from searchmerge.fusion.ensemble import combine_logits, ensemble_evaluate, task_logits


def test_combine_logits_by_hand():
    a = torch.tensor([[1.0, 4.0], [0.0, -2.0]])
    b = torch.tensor([[3.0, 0.0], [2.0, 1.0]])
    s = torch.stack([a, b])
    torch.testing.assert_close(combine_logits(s, "simple"), torch.tensor([[2.0, 2.0], [1.0, -0.5]]))
    torch.testing.assert_close(combine_logits(s, "weighted", [3, 1]), 0.75 * a + 0.25 * b)
    torch.testing.assert_close(combine_logits(s, "max"), torch.tensor([[3.0, 4.0], [2.0, 1.0]]))


def test_ensemble_evaluate_equals_hand_computed(linear_bench_path):
    bench = load_bench(linear_bench_path)
    mp, tp = bench.modelpool, bench.taskpool
    res = ensemble_evaluate(bench, "test", "weighted", weights=[2.0, 1.0])
    for t in tp.names:
        x = torch.tensor(np.asarray(tp.tasks[t].splits["test"].inputs, dtype=np.float32))
        head = mp.heads[t]
        logits = []
        for m in ("t0", "t1"):  # by hand: relu(x Wᵀ + b), then the task's head
            w, b = mp.finetuned[m]["net.0.weight"], mp.finetuned[m]["net.0.bias"]
            logits.append(torch.relu(x @ w.T + b) @ head["weight"].T + head["bias"])
        torch.testing.assert_close(task_logits(bench, mp.finetuned["t1"], t, "test"), logits[1])
        pred = ((2 * logits[0] + logits[1]) / 3).argmax(-1).numpy()
        assert res["per_task"][t] == pytest.approx(float((pred == tp.tasks[t].splits["test"].labels).mean()))
    assert res["forward_passes"] == 2 * res["n"] and res["models"] == 2


def test_ensemble_bad_input_before_work(linear_bench_path):
    bench = load_bench(linear_bench_path)
    with pytest.raises(Exception, match="one weight per model"):
        ensemble_evaluate(bench, "test", "weighted", weights=[1.0])
    with pytest.raises(Exception, match="mode"):
        ensemble_evaluate(bench, "test", "median")
