"""Several raylets on this machine (ray.cluster_utils.Cluster, in a subprocess: the pytest session's own Ray
is untouched): store replicas one per worker node, trials spread over nodes, and a node removed mid-search
whose trials run again on the remaining nodes, with the budget completed and no finished trial lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.cluster.ray_head import LOOPBACK_ENV

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(420)
def test_replicas_spread_over_nodes_and_a_removed_node_loses_no_trial(fixture_zoo, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="smmn", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | LOOPBACK_ENV | {"RAY_TMPDIR": temp_dir}
    done = subprocess.run([sys.executable, "-m", "tests.cluster.multinode_search", str(fixture_zoo),
                           str(tmp_path / "run"), temp_dir], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    shutil.rmtree(temp_dir, ignore_errors=True)  # kept only when the run failed (Ray's logs)
    f = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nfaults injected: {f['faults_injected']} node removed; trials completed: {f['trials_completed']}; "
          f"retried: {f['trials_retried']}; failed: {f['trials_failed']}; lost: {f['trials_lost']}; "
          f"nodes with trials: {len(f['nodes_with_trials'])}; {f['wall_s']} s")
    assert f["faults_injected"] == 1 and f["trials_lost"] == 0
    assert f["trials_completed"] + f["trials_failed"] == 10 and f["trials_completed"] >= 9
    assert len(f["nodes_with_trials"]) >= 2 and set(f["nodes_with_trials"]) <= set(f["worker_nodes"])
    before = f["replica_nodes_before_removal"]  # one replica per worker node: 2 replicas, 2 distinct nodes
    assert set(before) == {"0", "1"} and all(len(v) == 1 for v in before.values()) and before["0"] != before["1"]
    assert f["trials_after_removal"] >= 1 and f["trials_on_removed_node_after_removal"] == 0
    assert f["best_report_average"] > 0
