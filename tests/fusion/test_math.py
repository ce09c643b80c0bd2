"""Fisher / RegMean tensor maths against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from searchmerge.fusion.fisher import fisher_merge, model_coefficients
from searchmerge.fusion.regmean import regmean_merge, regmean_solve, shrink_off_diagonal


def _models(n: int = 3, seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g),
            "ids": torch.arange(5)}
    models = [{k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
               for k, v in base.items()} for _ in range(n)]
    return base, models


def test_uniform_fisher_is_simple_average():
    base, models = _models()
    fishers = [{k: torch.ones_like(v) for k, v in m.items() if v.is_floating_point()} for m in models]
    before = {k: v.clone() for k, v in models[0].items()}
    out = fisher_merge(base, models, fishers)
    for k in ("a.weight", "a.bias"):
        torch.testing.assert_close(out[k], torch.stack([m[k] for m in models]).mean(0))
    assert torch.equal(out["ids"], base["ids"])
    assert all(torch.equal(before[k], models[0][k]) for k in before)  # inputs untouched


def test_fisher_hand_computed_normalised_weights_and_exclusion():
    base, models = _models(2)
    f0 = {"a.weight": torch.full((4, 3), 2.0), "a.bias": torch.full((4,), 2.0)}
    f1 = {"a.weight": torch.full((4, 3), 1.0), "a.bias": torch.full((4,), 1.0)}
    eps = 1e-6
    n0, n1 = (16 * 4) ** 0.5, (16 * 1) ** 0.5  # ‖F‖ over all 16 merged entries
    s0, s1 = (1 / (n0 + eps)), (1 / (n1 + eps))
    c = torch.tensor([0.5 * s0 / (s0 + s1), 0.5 * s1 / (s0 + s1)], dtype=torch.float64)
    torch.testing.assert_close(model_coefficients([f0, f1], ["a.weight", "a.bias"]), c)
    out = fisher_merge(base, models, [f0, f1], exclude=[r"a\.bi"])
    w = [float(c[0]) * (2 + eps), float(c[1]) * (1 + eps)]
    expect = (w[0] * models[0]["a.weight"] + w[1] * models[1]["a.weight"]) / (w[0] + w[1])
    torch.testing.assert_close(out["a.weight"], expect)
    assert torch.equal(out["a.bias"], base["a.bias"])  # excluded: stays at the base (FusionBench)
    # without normalisation: plain Fisher-weighted mean with c = 1/N
    out2 = fisher_merge(base, models, [f0, f1], normalize=False)
    torch.testing.assert_close(out2["a.bias"], ((2 + eps) * models[0]["a.bias"] + (1 + eps) * models[1]["a.bias"]) / (3 + 2 * eps))


def test_shrink_off_diagonal():
    g = torch.arange(9.0).reshape(3, 3)
    s = shrink_off_diagonal(g, 0.5)
    assert torch.equal(s.diagonal(), g.diagonal())
    assert s[0, 1] == 0.5 and s[2, 1] == 3.5


def test_regmean_identity_gram_is_simple_average():
    base, models = _models()
    grams = [{"a": torch.eye(3)} for _ in models]
    out = regmean_merge(base, models, grams, alpha=0.7)
    for k in ("a.weight", "a.bias"):
        torch.testing.assert_close(out[k], torch.stack([m[k] for m in models]).mean(0))
    assert torch.equal(out["ids"], base["ids"])


def test_regmean_solve_matches_least_squares_and_conv1d_layout():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(50, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    ws = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    grams = [x.T @ x / len(x) for x in xs]
    merged = regmean_solve(ws, grams, 1.0)
    x = torch.cat(xs)
    y = torch.cat([xi @ wi.T for xi, wi in zip(xs, ws)])
    torch.testing.assert_close(merged, torch.linalg.lstsq(x, y).solution.T)
    torch.testing.assert_close(regmean_solve([w.T for w in ws], grams, 1.0, transpose=False), merged.T)


def test_regmean_dead_feature_gets_the_mean_column():
    ws = [torch.randn(2, 3), torch.randn(2, 3)]
    grams = [torch.diag(torch.tensor([1.0, 2.0, 0.0])), torch.diag(torch.tensor([3.0, 1.0, 0.0]))]
    out = regmean_solve(ws, grams, 0.9)
    torch.testing.assert_close(out[:, 2], (ws[0][:, 2] + ws[1][:, 2]) / 2)
    torch.testing.assert_close(out[:, 0], (ws[0][:, 0] * 1 + ws[1][:, 0] * 3) / 4)


def test_regmean_rejects_bad_alpha():
    base, models = _models(2)
    with pytest.raises(ValueError, match="alpha"):
        regmean_merge(base, models, [{}, {}], alpha=1.5)


def test_regmean_pp_steps_in_depth_order():
    from searchmerge.fusion.regmean_pp import steps

    names = ["encoder.layer.1.q", "pooler.dense", "encoder.layer.0.q", "encoder.layer.0.k", "encoder.layer.10.q"]
    assert steps(names) == [["encoder.layer.0.q", "encoder.layer.0.k"], ["encoder.layer.1.q"], ["encoder.layer.10.q"],
                            ["pooler.dense"]]
