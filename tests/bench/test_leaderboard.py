"""Leaderboard on the fixture zoo, and the bench CLI function."""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq

from searchmerge.bench.leaderboard import FIXED, default_entries, run_leaderboard


def test_leaderboard_fixture(fixture_bench, tmp_path):
    res = run_leaderboard(fixture_bench, tmp_path / "lb", entries=default_entries(sweep=(1.0,), fusion=False), progress=False)
    rows = {(r["method"], r["split"]): r for r in res["rows"]}
    for e in FIXED:
        assert (e.label, "test") in rows and (e.label, "validation") in rows
    from searchmerge.methods.registry import list_methods

    registered = {m.name for m in list_methods()}
    for m in ("magmax", "model_stock", "iso_c", "tsv_m"):
        assert ((m, "test") in rows) == (m in registered)
    avg = {k: rows[(k, "test")]["average"] for k in ("pretrained", "individual", "task_arithmetic")}
    assert avg["pretrained"] < avg["task_arithmetic"] < avg["individual"]
    for ext in ("md", "csv", "parquet"):
        assert res["paths"][ext].is_file()
    assert not list((tmp_path / "lb").glob(".*tmp*"))
    table = pq.read_table(res["paths"]["parquet"]).to_pydict()
    assert len(table["method"]) == len(res["rows"]) and "task:parity" in table and "time_s" in table
    md = res["paths"]["md"].read_text()
    assert "| ties |" in md and "### test" in md and "### validation" in md


def test_bench_cli(fixture_zoo, tmp_path):
    from searchmerge.bench.cli import add_bench_commands

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_commands(sub)
    args = parser.parse_args(["bench", str(fixture_zoo), "--out", str(tmp_path / "o"), "--splits", "test",
                              "--methods", "pretrained,ties", "--no-sweep", "--quiet"])
    assert args.fn(args) == 0
    text = (tmp_path / "o" / "leaderboard.md").read_text()
    assert "| pretrained |" in text and "| ties |" in text and "validation" not in text
