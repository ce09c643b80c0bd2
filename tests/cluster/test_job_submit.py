"""`searchmerge search SPEC --address http://…`: a real Ray head on loopback, the search submitted as a Ray job
(the project folder as its working dir), the run folder checked, and only that head stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.cluster.ray_head import LOOPBACK_ENV, own_processes, ray_head

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def test_a_search_submitted_as_a_ray_job_writes_its_run_folder(fixture_zoo, tmp_path):
    cache = fixture_zoo.parents[2]  # <cache>/zoo/fixture-<hash>/bench.yaml: the job reuses the built zoo
    out = tmp_path / "runs" / "job"  # absolute, on storage the (one-node) cluster shares
    t0 = time.monotonic()
    with ray_head(num_cpus=2) as head:
        started = time.monotonic() - t0
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | LOOPBACK_ENV
        cmd = [sys.executable, "-m", "searchmerge", "search", "experiments/search-fixture.yaml", "--address",
               head.dashboard, "--out", str(out), "--budget", "3",
               "--runtime-env-json", json.dumps({"env_vars": {"SEARCHMERGE_CACHE": str(cache)}})]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-4000:]
        assert own_processes(head.temp_dir)  # the head is still up until the context ends
        temp_dir = head.temp_dir
    assert not own_processes(temp_dir)  # every process of that head is gone (and nothing else was touched)
    assert "submitted raysubmit_" in log and "SUCCEEDED" in log
    trials = pd.read_parquet(out / "trials.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert len(trials) == 3 and (trials.status == "done").all() and trials.node.notna().all()
    assert summary["trials"] == 3 and summary["best"]["report"]["average"] > 0
    print(f"\nhead up in {started:.1f} s; job + search {time.monotonic() - t0 - started:.1f} s; "
          f"{len(trials)} trials on node(s) {sorted(set(trials.node.str[:8]))}")


def test_submitting_needs_a_shared_run_folder_and_a_spec_inside_the_working_dir(tmp_path):
    """Caught before anything is sent: one line, exit 2 (no head needed: the address is never contacted)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | LOOPBACK_ENV
    base = [sys.executable, "-m", "searchmerge", "search", "experiments/search-fixture.yaml", "--address",
            "http://127.0.0.1:9"]
    rel = subprocess.run([*base, "--out", "runs/x"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert rel.returncode == 2 and "vanish" in rel.stderr and "Traceback" not in rel.stderr
    creds = subprocess.run([*base, "--out", "/mnt/shared/x", "--runtime-env-json",
                            '{"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}}'],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert creds.returncode == 2 and "credentials" in creds.stderr
    remote = subprocess.run([*base, "--out", "s3://KEY:SECRET@bucket/runs/x"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)  # a bucket is fine (the nodes' role reaches it), keys in it are not
    assert remote.returncode == 2 and "credentials in the URI" in remote.stderr and "SECRET" not in remote.stderr
