"""A search on a simulated multi-node cluster (``ray.cluster_utils.Cluster``: a head and 3 worker raylets on
this machine), with the node of store replica 0 removed mid-search. Run in its own process by
test_multinode.py (it cannot share a pytest session's ``ray.init``):

    python -m tests.cluster.multinode_search BENCH_YAML OUT_DIR TEMP_DIR

Prints one JSON line of figures last. Every address is 127.0.0.1; Ray's files stay in TEMP_DIR (RAY_TMPDIR),
so no other Ray on the machine sees this cluster.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

BUDGET = 10
WORKERS = 3


def main(bench: str, out: Path, temp_dir: str) -> dict:
    import pandas as pd
    import ray
    from ray.cluster_utils import Cluster

    from searchmerge.search import search
    from searchmerge.search.spec import parse_search_spec

    (Path(temp_dir) / "ray").mkdir(parents=True, exist_ok=True)  # RAY_TMPDIR/ray: Ray's default temp dir here
    common = {"object_store_memory": 120 * 1024**2, "include_dashboard": False, "num_gpus": 0}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **common})  # as cluster.yaml: the head drives
    workers = [cluster.add_node(num_cpus=1, resources={f"worker_{i}": 1}, **common) for i in range(WORKERS)]
    cluster.wait_for_nodes()
    removed: list[str] = []
    removed_at: list[float] = []

    def remove_replica_node() -> None:  # once both replicas have finished a trial, remove the node of replica 0
        path = out / "trials.parquet"
        while True:
            time.sleep(0.2)
            try:
                t = pd.read_parquet(path)
            except Exception:  # noqa: BLE001 - not written yet
                continue
            if t.node.notna().any() and (t.replica.dropna().nunique() >= 2 or len(t) >= 4):
                node_id = t.loc[t.replica == 0, "node"].dropna().iloc[0]
                victim = next(w for w in workers if w.node_id == node_id)
                cluster.remove_node(victim, allow_graceful=False)
                removed.append(node_id)
                removed_at.append(time.time())
                return

    spec = parse_search_spec({"bench": bench, "methods": {"task_arithmetic": {"lambda": [0.1, 1.5]}},
                              "searcher": "random", "budget": {"trials": BUDGET}, "seed": 3, "eval_batch_size": 8,
                              "concurrency": 2, "cpus_per_replica": 0.5, "trial_retries": 3})
    killer = threading.Thread(target=remove_replica_node, daemon=True)
    killer.start()
    t0 = time.time()
    try:
        res = search(spec, out, address=cluster.address, progress=False)
        nodes_seen = sorted({n["NodeID"] for n in ray.nodes() if n.get("Alive")})
    finally:
        ray.shutdown()
        cluster.shutdown()
    trials = pd.read_parquet(out / "trials.parquet")
    done = trials[trials.status == "done"]
    return {
        "faults_injected": len(removed),
        "removed_node": removed[0] if removed else None,
        "trials_completed": int(len(done)),
        "trials_failed": int((trials.status == "failed").sum()),
        "trials_retried": int(trials.get("trial_retries", pd.Series(dtype=int)).fillna(0).sum()
                              + trials.get("store_retries", pd.Series(dtype=float)).fillna(0).sum()),
        "trials_lost": BUDGET - len(trials),
        "nodes_with_trials": sorted({str(n) for n in done.node.dropna()}),
        "replica_nodes_before_removal": {str(int(r)): sorted(set(g.node.dropna())) for r, g in
                                         done[done.end_time < removed_at[0]].groupby("replica")} if removed else {},
        "trials_after_removal": int((done.start_time > removed_at[0]).sum()) if removed else 0,
        "trials_on_removed_node_after_removal": int(((done.node == removed[0]) & (done.start_time > removed_at[0])).sum())
        if removed else 0,
        "alive_nodes_at_end": len(nodes_seen),
        "worker_nodes": [w.node_id for w in workers],
        "best_report_average": res.summary["best"]["report"]["average"],
        "wall_s": round(time.time() - t0, 1),
    }


if __name__ == "__main__":
    figures = main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
    print(json.dumps(figures))
