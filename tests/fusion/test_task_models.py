"""The passes on Hugging Face task-model folders (``seqcls_task``) agree with plain ``transformers``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchmerge.bench.pool import load_bench
from searchmerge.fusion import stats as S
from searchmerge.fusion.forward import iter_batches, task_module
from tests.bench.test_task_models import _pool, _tok


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_fisher_and_gram_match_plain_transformers(tmp_path, arch):
    path, ft = _pool(tmp_path, arch)
    bench = load_bench(path)
    mp, tp = bench.modelpool, bench.taskpool
    m = ft["a"]
    texts = [str(x) for x in tp.tasks["a"].splits["train"].inputs[:4]]
    enc = _tok()(texts, padding=True, return_tensors="pt")
    if arch == "gpt2":
        m.config.pad_token_id = 0
    m.zero_grad()
    logits = m(**enc).logits
    p = torch.softmax(logits, -1).detach()
    (p.sqrt() * torch.log_softmax(logits, -1)).sum().backward()
    prefix = m.base_model_prefix
    from searchmerge.bench.evaluate import task_features

    feats = task_features(mp.model(mp.base), tp, "a", "train")
    module = task_module(mp, mp.finetuned["a"], "a")
    fisher = S.fisher_pass(module, iter_batches(feats, np.arange(4), 4))
    named, compared = dict(m.named_parameters()), 0
    for k, v in fisher.items():
        g = named.get(f"{prefix}.{k}")
        if g is not None and g.grad is not None:
            torch.testing.assert_close(v, (g.grad ** 2) / 4, rtol=1e-4, atol=1e-9)
            compared += 1
    assert compared >= len(fisher) - 2  # all but tied / unused tensors
    grams, transposed = S.gram_pass(module, iter_batches(feats, np.arange(4), 2))
    kind = "attn.c_attn" if arch == "gpt2" else "attention.self.query"
    name = next(n for n in grams if kind in n)
    assert transposed[name] is (arch == "bert")  # GPT-2's Conv1D stores [in, out]
    assert grams[name].shape[0] == 16
    from searchmerge.fusion.regmean import regmean_merge

    merged = regmean_merge(mp.base, [mp.finetuned["a"], mp.finetuned["b"]],
                           [grams, S.gram_pass(task_module(mp, mp.finetuned["b"], "b"),
                                               iter_batches(feats, np.arange(4), 2))[0]],
                           alpha=0.9, transposed=transposed)
    assert all(merged[k].shape == mp.base[k].shape and torch.isfinite(merged[k]).all()
               for k in merged if merged[k].is_floating_point())


def test_every_job_runs_on_bert_task_models(tmp_path, monkeypatch):
    from searchmerge.fusion.adamerging import AdaMergingConfig, adamerge, recipe_with_paths
    from searchmerge.fusion.jobs import run_fusion
    from searchmerge.merge import merge

    monkeypatch.setenv("SEARCHMERGE_CACHE", str(tmp_path / "cache"))
    path, _ = _pool(tmp_path / "pool", "bert")
    bench = load_bench(path)
    for method, params in [("fisher", {"examples": 8, "batch_size": 4}), ("regmean", {"examples": 8}),
                           ("regmean_plusplus", {"examples": 8}), ("adamerging", {"steps": 3, "batch_size": 4}),
                           ("ensemble", {"mode": "max"})]:
        job = run_fusion(bench, method, params, ["test"])
        assert 0.0 <= job["results"]["test"]["average"] <= 1.0, method
    res = adamerge(bench, AdaMergingConfig(granularity="layer", steps=2, batch_size=4))
    out = merge(recipe_with_paths(bench, res.recipe))  # task-model folders: the backbone is merged
    assert all(torch.equal(out[k], res.merged[k]) for k in res.merged)
