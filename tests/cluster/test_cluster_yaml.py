"""cluster.yaml: what `ray up` needs, the package installed with its pins, nothing exposed, shared storage."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_it_has_the_fields_the_launcher_needs():
    c = load()
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert c.get(key) is not None, key
    assert c["provider"]["type"] and c["provider"]["region"]
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    workers = [t for n, t in types.items() if n != c["head_node_type"]]
    assert workers and all(t["max_workers"] <= c["max_workers"] and t["min_workers"] == 0 for t in workers)  # autoscaling
    assert all("node_config" in t for t in types.values())
    assert any(re.match(r"^(p\d|g\d)", t["node_config"]["InstanceType"]) for t in workers)  # a GPU worker type


def test_setup_installs_this_package_with_its_pinned_versions():
    c = load()
    setup = " && ".join(c["setup_commands"])
    install = [cmd for cmd in c["setup_commands"] if "pip install" in cmd and "-e" in cmd]
    assert install and "-c constraints.txt" in install[0] and "~/searchmerge" in install[0]
    assert c["file_mounts"]["~/searchmerge"] == "."  # this project folder, synced to every node
    pins = {line.split("==")[0]: line for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    assert pins["torch"] in setup  # the torch pin, spelled as in constraints.txt
    assert "[jobs]" in install[0]  # ray[default]: the job server
    assert "/mnt/shared" in setup and "SEARCHMERGE_CACHE=/mnt/shared" in setup  # shared storage for zoos and runs


def test_the_dashboard_stays_on_localhost_with_auth_on_and_usage_stats_off():
    c = load()
    head = " ".join(c["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head and "--disable-usage-stats" in head
    assert "RAY_AUTH_MODE=token" in head
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()
    worker = " ".join(c["worker_start_ray_commands"])
    assert "$RAY_HEAD_IP" in worker and "--disable-usage-stats" in worker and "RAY_AUTH_MODE=token" in worker
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"(AWS_SECRET|AWS_ACCESS_KEY_ID|aws_secret_access_key)\s*[:=]", text)  # roles, not keys
