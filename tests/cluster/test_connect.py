"""Addresses, replica placement and the job's runtime env: pure functions, no cluster needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from searchmerge.cluster import ClusterError, NodeInfo, replica_nodes, resolve_address
from searchmerge.cluster.jobs import RAY_WORKING_DIR_LIMIT, job_runtime_env, search_entrypoint, working_dir_bytes
from searchmerge.errors import SearchmergeError

ROOT = Path(__file__).resolve().parents[2]


def test_address_comes_from_the_flag_then_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None  # a local Ray
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert resolve_address(None) == "10.0.0.5:6379"
    assert resolve_address("ray://head:10001") == "ray://head:10001"  # the flag wins
    assert resolve_address("auto") == "auto" and resolve_address("local") is None
    assert resolve_address("http://127.0.0.1:8265") == "http://127.0.0.1:8265"


@pytest.mark.parametrize("bad", ["head", "ftp://x:1", "ray://", "http://a b:1"])
def test_a_bad_address_is_one_clear_error(bad, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match="not a Ray address"):
        resolve_address(bad)


def nodes(*spec):
    return [NodeInfo(f"n{i}", f"10.0.0.{i}", cpus, gpus) for i, (cpus, gpus) in enumerate(spec)]


def test_replicas_spread_one_per_node_before_doubling_up():
    assert replica_nodes(3, 1, nodes((4, 0), (4, 0), (4, 0))) == ["n0", "n1", "n2"]
    assert replica_nodes(4, 1, nodes((4, 0), (4, 0))) == ["n0", "n1", "n0", "n1"]
    assert replica_nodes(2, 2, nodes((1, 0), (2, 0))) == ["n1", "n1"]  # only n1 fits one
    assert replica_nodes(2, 1, nodes((8, 0), (8, 8), (8, 8))) == ["n1", "n2"]  # GPU nodes first
    assert replica_nodes(2, 1, nodes((8, 0), (8, 8)), prefer_gpu=False) == ["n0", "n1"]


def test_the_head_node_hosts_replicas_only_when_nothing_else_fits():
    head = NodeInfo("h", "10.0.0.1", 4, 0, head=True)
    workers = nodes((2, 0), (2, 0))
    assert replica_nodes(2, 1, [head, *workers]) == ["n0", "n1"]
    assert replica_nodes(2, 1, [head]) == ["h", "h"]


def test_the_working_dir_upload_leaves_venvs_runs_and_weights_behind(tmp_path):
    (tmp_path / "searchmerge").mkdir()
    (tmp_path / "searchmerge" / "a.py").write_text("x = 1\n")
    for junk in (".venv/lib/big.so", "runs/r/trials.parquet", "zoo/m/model.safetensors", "pkg/__pycache__/a.pyc"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_bytes(b"0" * 10_000)
    (tmp_path / "searchmerge" / "zoo").mkdir()  # a package named like an excluded top-level folder stays
    (tmp_path / "searchmerge" / "zoo" / "b.py").write_text("y = 2\n")
    size, top = working_dir_bytes(tmp_path)
    assert size == 12 and top == [("searchmerge", 12)]
    assert working_dir_bytes(ROOT)[0] < RAY_WORKING_DIR_LIMIT / 10  # the project itself: far under Ray's limit


def test_runtime_env_refuses_credentials_and_entrypoint_needs_shared_storage(tmp_path):
    env = job_runtime_env(tmp_path, {"env_vars": {"OMP_NUM_THREADS": "1"}, "pip": ["x"]})
    assert env["env_vars"]["OMP_NUM_THREADS"] == "1" and env["pip"] == ["x"] and ".venv" in env["excludes"]
    with pytest.raises(ClusterError, match="credentials"):
        job_runtime_env(tmp_path, {"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}})
    spec = tmp_path / "experiments" / "s.yaml"
    spec.parent.mkdir()
    spec.write_text("x")
    cmd = search_entrypoint(spec, "/mnt/shared/runs/a", tmp_path, ["--budget", "3"])
    assert cmd == "python -m searchmerge search experiments/s.yaml --out /mnt/shared/runs/a --budget 3"
    for remote in ("s3://b/r", "gs://b/r"):  # staged by the job's driver and mirrored (searchmerge.io.remote)
        assert search_entrypoint(spec, remote, tmp_path, []).endswith(f"--out {remote}")
    with pytest.raises(SearchmergeError, match="no filesystem for foo://"):
        search_entrypoint(spec, "foo://b/r", tmp_path, [])
    with pytest.raises(ClusterError, match="vanish"):
        search_entrypoint(spec, "runs/a", tmp_path, [])
    with pytest.raises(ClusterError, match="outside the working dir"):
        search_entrypoint(spec, "/mnt/x", tmp_path / "experiments" / "nope", [])


def test_an_unusable_run_folder_uri_is_one_clear_error_before_any_work():
    from searchmerge.search import search

    with pytest.raises(SearchmergeError, match=r"^--out foo://bucket/runs/x: pyarrow has no filesystem .* /mnt/shared/runs/NAME"):
        search(ROOT / "experiments" / "search-fixture.yaml", "foo://bucket/runs/x")
    assert not (Path.cwd() / "foo:").exists()


def test_an_autoscaling_cluster_is_asked_for_the_replicas_and_waited_for():
    from searchmerge.cluster.connect import ClusterUnreachable
    from searchmerge.cluster.placement import ensure_capacity, replica_slots

    head = NodeInfo("h", "10.0.0.1", 0, 0, head=True)
    gpu_node = NodeInfo("g", "10.0.0.2", 96, 8)
    assert replica_slots([head, gpu_node], 1.01, gpu=True) == 8 and replica_slots([head], 1.01) == 0
    views = iter([[head], [head], [head, gpu_node]])  # the head alone (cluster.yaml: min_workers 0), then a worker
    asked: list = []
    got = ensure_capacity(4, 1.01, gpu=True, nodes_fn=lambda: next(views), request=lambda **kw: asked.append(kw),
                          sleep=lambda s: None, say=lambda m: None)
    assert got[-1] is gpu_node and asked == [{"bundles": [{"CPU": 1.01, "GPU": 1}] * 4}]
    with pytest.raises(ClusterUnreachable, match="holds 0 of 2 replica"):
        ensure_capacity(2, 1, nodes_fn=lambda: [head], request=lambda **kw: None, sleep=lambda s: None,
                        say=lambda m: None, timeout_s=0)
