"""``--out URI``: the run folder is staged locally and mirrored to a pyarrow filesystem. ``file://`` (pyarrow's
LocalFileSystem through ``FileSystem.from_uri``) stands in for ``s3://`` / ``gs://``: the same code path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from searchmerge.errors import OutputError
from searchmerge.io import remote

from .test_resume import unfinished_in_tune_state
from .test_search_runs import make_spec

pytestmark = pytest.mark.timeout(280)
ROOT = Path(__file__).resolve().parents[2]


def _rows(folder: Path) -> list[str]:
    p = folder / "trials.parquet"
    return pd.read_parquet(p).trial_id.tolist() if p.exists() else []


def _counting_push(monkeypatch, folder: Path) -> list[tuple[bool, list[str]]]:
    """Wrap ``remote.push``: each call records (a full push?, the trial ids the remote trials.parquet then holds)."""
    calls: list[tuple[bool, list[str]]] = []
    real = remote.push

    def push(local, uri, paths=None):  # noqa: ANN001, ANN202
        n = real(local, uri, paths)
        calls.append((paths is None, _rows(folder)))
        return n

    monkeypatch.setattr(remote, "push", push)
    return calls


def test_uri_helpers_push_pull_and_checks(tmp_path, monkeypatch):
    from searchmerge.cluster.connect import ClusterError
    from searchmerge.cluster.jobs import search_entrypoint

    monkeypatch.setenv("SEARCHMERGE_STAGING", str(tmp_path / "staging"))
    assert remote.is_uri("s3://b/r") and remote.is_uri(Path("gs://b/r")) and not remote.is_uri("/mnt/shared/r")
    assert not remote.is_uri("runs/x") and not remote.is_uri("C:/runs/x")
    assert remote.normalize(Path("s3://b/r")) == "s3://b/r" and remote.normalize(Path("file:///tmp/r")) == "file:///tmp/r"
    assert remote.staging_dir("s3://b/runs/r1").parent.name.startswith("r1-")
    assert remote.staging_dir("s3://b/runs/r1") != remote.staging_dir("s3://c/runs/r1")  # named from a hash of the URI
    local = tmp_path / "local"
    (local / "tune" / "trial_0").mkdir(parents=True)
    (local / "a.txt").write_text("a")
    (local / "tune" / "state.json").write_text("{}")
    (local / "tune" / "trial_0" / "result.json").write_text("1")
    uri = (tmp_path / "bucket" / "run").as_uri()
    assert remote.push(local, uri, ["a.txt"]) == 1 and remote.listing(uri) == ["a.txt"]
    assert remote.push(local, uri) == 3
    assert remote.listing(uri) == ["a.txt", "tune/state.json", "tune/trial_0/result.json"]  # no temp names left
    assert remote.exists(uri, "tune") and not remote.exists(uri, "tun")
    back = tmp_path / "back"
    (back / "stale").mkdir(parents=True)
    assert remote.pull(uri, back, skip=["tune"]) == 1 and sorted(os.listdir(back)) == ["a.txt"]  # replaced, not merged
    (local / "a.txt").unlink()
    assert remote.prune(local, uri) == 1 and "a.txt" not in remote.listing(uri)
    with pytest.raises(OutputError, match=r"^--out foo://x: pyarrow has no filesystem for foo:// URIs — use s3://"):
        remote.check_uri("foo://x")
    with pytest.raises(OutputError, match=r"credentials in the URI") as err:
        remote.check_uri("s3://AKIAXX:hunter2@bucket/r", probe=False)
    assert "hunter2" not in str(err.value) and "AKIAXX" not in str(err.value)  # never echoed
    with pytest.raises(OutputError, match=r"credentials in the URI"):
        remote.check_uri("gs://bucket/r?access_token=x", probe=False)
    spec = tmp_path / "experiments" / "s.yaml"
    spec.parent.mkdir()
    spec.write_text("x")
    cmd = search_entrypoint(spec, "s3://bucket/runs/a", tmp_path, [])  # the nodes' roles reach it: not probed here
    assert cmd == "python -m searchmerge search experiments/s.yaml --out s3://bucket/runs/a"
    with pytest.raises(OutputError, match="credentials"):
        search_entrypoint(spec, "s3://k:s@bucket/runs/a", tmp_path, [])
    with pytest.raises((OutputError, ClusterError), match="no filesystem for foo://"):
        search_entrypoint(spec, "foo://bucket/runs/a", tmp_path, [])


def test_a_bad_uri_is_one_clear_error_before_any_work(tmp_path):
    env = {**os.environ, "SEARCHMERGE_STAGING": str(tmp_path / "staging"), "RAY_ADDRESS": ""}
    for cmd in (["search", "experiments/search-fixture.yaml", "--out", "foo://bucket/runs/x"], ["report", "foo://bucket/runs/x"]):
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "searchmerge", *cmd], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith(f"searchmerge: error: {'--out' if cmd[0] == 'search' else 'report'} foo://bucket/runs/x: ")
        assert "s3://, gs://" in lines[0] and "/mnt/shared/runs/NAME" in lines[0]
        print(f"\n{cmd[0]} foo://…: exit 2 in {time.monotonic() - t0:.1f} s: {lines[0]}")
    assert not (tmp_path / "staging").exists()  # refused before any work


def test_search_to_a_uri_mirrors_every_trial_then_the_whole_folder(fixture_zoo, ray_session, tmp_path, monkeypatch, capsys):
    from searchmerge.cli import main
    from searchmerge.search import search
    from searchmerge.search.spec import SearchSpecError

    monkeypatch.setenv("SEARCHMERGE_STAGING", str(tmp_path / "staging"))
    folder = tmp_path / "bucket" / "runs" / "r1"
    uri = "file://" + str(folder)
    calls = _counting_push(monkeypatch, folder)
    t0 = time.monotonic()
    res = search(make_spec(fixture_zoo, budget={"trials": 4}, searcher="random"), uri, progress=False)
    took = time.monotonic() - t0
    live = [ids for full, ids in calls if not full]
    assert len(live) >= 4 and [len(ids) for ids in live][:4] == [1, 2, 3, 4]  # pushed after every trial, in order
    assert all(ids[: len(prev)] == prev for prev, ids in zip(live, live[1:]))  # every finished trial, every time
    assert calls[-1][0]  # and everything at the end
    files = remote.listing(uri)
    for name in ("trials.parquet", "summary.json", "best.yaml", "spec.yaml", "best_so_far.png", "best_so_far.html",
                 "tune/tuner.pkl"):
        assert name in files, name
    assert not [f for f in files if remote._TMP in f]
    assert res.out.is_relative_to(tmp_path / "staging")  # the staging folder
    assert pd.read_parquet(folder / "trials.parquet").equals(pd.read_parquet(res.out / "trials.parquet"))
    assert len(_rows(folder)) == 4
    summary = yaml.safe_load((folder / "summary.json").read_text())
    assert all(p.startswith(uri + "/") for p in summary["plots"])
    capsys.readouterr()
    assert main(["report", uri]) == 0
    assert "best searched" in capsys.readouterr().out
    print(f"\n4 trials to {uri}: {took:.1f} s, {len(live)} live pushes, {len(files)} files mirrored")

    with pytest.raises(SearchSpecError, match="exists and is not empty; pass --resume"):
        search(make_spec(fixture_zoo, budget={"trials": 2}, searcher="random"), uri, progress=False)
    old = _rows(folder)
    (tmp_path / "old-only.txt").write_text("x")
    remote.push(tmp_path, uri, ["old-only.txt"])
    calls.clear()
    search(make_spec(fixture_zoo, budget={"trials": 2}, searcher="random"), uri, force=True, progress=False)
    assert [full for full, _ in calls] == [True]  # --force: nothing pushed until the new search had finished
    new = _rows(folder)
    assert len(new) == 2 and not set(new) & set(old)
    assert "old-only.txt" not in remote.listing(uri)  # the old run replaced, not merged
    assert all(any(d.iterdir()) for d in (folder / "tune").iterdir() if d.is_dir())  # no empty old trial folders


def test_driver_killed_then_resume_from_the_uri_keeps_every_finished_trial(fixture_zoo, ray_session, tmp_path,
                                                                           monkeypatch):
    from searchmerge.search import search

    staging = tmp_path / "staging"
    spec = {"name": "resume-uri", "bench": str(fixture_zoo), "methods": {"task_arithmetic": {"lambda": [0.0, 1.5]}},
            "searcher": "optuna_tpe", "budget": {"trials": 10}, "seed": 0}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    folder = tmp_path / "bucket" / "runs" / "r2"
    uri = "file://" + str(folder)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", "SEARCHMERGE_STAGING": str(staging)}
    proc = subprocess.Popen([sys.executable, "-m", "searchmerge.cli", "search", str(spec_path), "--out", uri],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 150
    try:
        while time.time() < deadline:
            if len(_rows(folder)) >= 3:  # on the remote side
                break
            assert proc.poll() is None, "the search ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no 3 finished trials on the remote side within the deadline")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = pd.read_parquet(folder / "trials.parquet")
    assert 3 <= len(before) < 10 and remote.exists(uri, "tune")
    in_flight = unfinished_in_tune_state(folder / "tune")
    import shutil

    shutil.rmtree(staging)  # the resume reads the URI, not what the killed driver left here
    monkeypatch.setenv("SEARCHMERGE_STAGING", str(staging))
    calls = _counting_push(monkeypatch, folder)
    search(spec_path, uri, resume=True, progress=False)
    live = [ids for full, ids in calls if not full]
    assert live and all(set(before.trial_id) <= set(ids) for ids in live)  # while it ran: every finished trial
    after = pd.read_parquet(folder / "trials.parquet")
    kept = after.set_index("trial_id").loc[before.trial_id]
    assert (kept.average.to_numpy() == before.average.to_numpy()).all()
    assert after.trial_id.is_unique and (after.status == "done").all()
    fresh = after[~after.duplicate.astype(bool)]
    assert fresh.recipe_key.is_unique and 9 <= len(fresh) <= 11
    lost = len(set(before.trial_id) - set(after.trial_id))
    new = after[~after.trial_id.isin(before.trial_id)]
    retried = len(set(new.trial_id[new.duplicate.astype(bool)]) | (in_flight & set(after.trial_id)))
    print(f"\nfaults injected: 1 (driver SIGKILL, {len(before)} trials on {uri}); trials completed: {len(after)}; "
          f"trials retried: {retried}; trials lost: {lost}; {len(live)} live pushes after --resume")
    assert lost == 0
