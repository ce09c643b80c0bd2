"""The data-driven methods as leaderboard rows on the fixture zoo."""

from __future__ import annotations

import pytest

from searchmerge.bench.leaderboard import FUSION, Entry, default_entries, run_leaderboard
from searchmerge.bench.pool import BenchSpecError
from searchmerge.fusion.jobs import resolve_params


def test_fusion_rows_on_fixture(fixture_bench, tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHMERGE_CACHE", str(tmp_path / "cache"))
    entries = [e for e in default_entries(sweep=()) if e.label in ("pretrained", "task_arithmetic")]
    fast = [Entry(e.label, e.method, {**e.parameters, "steps": 10} if e.method == "adamerging" else e.parameters,
                  kind=e.kind) for e in FUSION]
    res = run_leaderboard(fixture_bench, tmp_path / "lb", entries=entries + fast, progress=False)
    rows = {(r["method"], r["split"]): r for r in res["rows"]}
    n = len(fixture_bench.taskpool.names)
    for e in FUSION:
        for s in ("validation", "test"):
            r = rows[(e.label, s)]
            assert 0.0 <= r["average"] <= 1.0 and r["forward_passes"] == (n if e.method == "ensemble" else 1)
    assert rows[("fisher", "test")]["stats_s"] > 0 and rows[("regmean", "test")]["stats_s"] > 0
    assert rows[("ensemble_simple", "test")]["average"] > rows[("pretrained", "test")]["average"]
    assert rows[("regmean", "test")]["average"] > rows[("pretrained", "test")]["average"]
    md = res["paths"]["md"].read_text()
    assert "| regmean |" in md and "passes" in md
    cached = sorted((tmp_path / "cache" / "fusion").rglob("*.safetensors"))
    assert len(cached) == 2 * n  # one Fisher and one Gram file per model
    # a second run reuses them: no new files
    run_leaderboard(fixture_bench, tmp_path / "lb2", entries=FUSION[:2], progress=False)
    assert sorted((tmp_path / "cache" / "fusion").rglob("*.safetensors")) == cached


@pytest.mark.parametrize("method, params, match", [
    ("fisher", {"example": 3}, "no parameter"), ("regmean", {"alpha": 2.0}, "alpha"),
    ("fisher", {"split": "test"}, "never reads the report"), ("adamerging", {"split": "test"}, "report split"),
    ("ensemble", {"mode": 3}, "expected str"), ("wudi", {}, "unknown data-driven method"),
])
def test_bad_parameters_refused_before_work(fixture_bench, tmp_path, method, params, match):
    with pytest.raises(BenchSpecError, match=match):
        resolve_params(method, params)
    with pytest.raises(BenchSpecError, match=match):
        run_leaderboard(fixture_bench, tmp_path / "lb", entries=[Entry("pretrained"), Entry("x", method, params, kind="fusion")],
                        progress=False)
    assert not (tmp_path / "lb").exists()


def test_device_checked_before_work():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: `cuda` is valid here")
    for method in ("fisher", "regmean", "adamerging"):
        with pytest.raises(BenchSpecError, match="CUDA is not available"):
            resolve_params(method, {"device": "cuda"})
    assert resolve_params("regmean", {"device": "auto"})["device"] == "auto"
