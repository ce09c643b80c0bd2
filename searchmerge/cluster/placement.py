"""Which node holds which store replica: one replica per node that can host it, round-robin, counted from
the cluster (``ray.nodes()``), never from this machine's ``torch.cuda.device_count()``.

A replica is a whole resident store (θ₀ and every task vector, plus its evaluation model): trials that use
it never copy weights across nodes. Affinity is *soft*, so a replica whose node is lost restarts on another.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from searchmerge.cluster.connect import ClusterUnreachable


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    cpus: float
    gpus: float
    head: bool = False


def alive_nodes() -> list[NodeInfo]:
    """The cluster's live nodes with their total CPUs and GPUs, in a stable order (by address, then id)."""
    import ray

    out = [NodeInfo(n["NodeID"], n.get("NodeManagerAddress", ""), float(n["Resources"].get("CPU", 0.0)),
                    float(n["Resources"].get("GPU", 0.0)), "node:__internal_head__" in n["Resources"])
           for n in ray.nodes() if n.get("Alive")]
    return sorted(out, key=lambda n: (n.address, n.node_id))


def replica_nodes(n_replicas: int, cpus_per_replica: float, nodes: list[NodeInfo] | None = None,
                  prefer_gpu: bool = True) -> list[str]:
    """The node id for each of ``n_replicas`` replicas: spread over the nodes that fit one (GPU nodes first
    when ``prefer_gpu``), a node taking a second replica only once every node has one. The head node (the
    driver's, often with ``num-cpus: 0``) hosts replicas only when no worker node fits one."""
    nodes = alive_nodes() if nodes is None else nodes
    fit = [n for n in nodes if n.cpus >= cpus_per_replica] or list(nodes)
    if any(not n.head for n in fit):
        fit = [n for n in fit if not n.head]
    if prefer_gpu and any(n.gpus > 0 for n in fit):
        fit = [n for n in fit if n.gpus > 0]
    if not fit:
        return []
    return [fit[i % len(fit)].node_id for i in range(n_replicas)]


def replica_slots(nodes: list[NodeInfo], cpus_per_replica: float, gpu: bool = False) -> int:
    """How many replicas the worker nodes (else the head) hold: CPUs per replica, and a GPU each when ``gpu``."""
    workers = [n for n in nodes if not n.head] or nodes
    per = [math.floor(n.cpus / cpus_per_replica + 1e-9) if cpus_per_replica > 0 else 0 for n in workers]
    if gpu:
        per = [min(k, math.floor(n.gpus)) for k, n in zip(per, workers)]
    return sum(per)


def ensure_capacity(n_replicas: int, cpus_per_replica: float, gpu: bool = False, timeout_s: float = 900.0,
                    nodes_fn: Callable[[], list[NodeInfo]] = alive_nodes, request: Callable[..., None] | None = None,
                    sleep: Callable[[float], None] = time.sleep, say: Callable[[str], None] = print) -> list[NodeInfo]:
    """On an autoscaling cluster (``cluster.yaml`` starts with no workers), ask the autoscaler for
    ``n_replicas`` bundles and wait until the nodes that hold them have joined; returns the live nodes."""
    nodes = nodes_fn()
    if replica_slots(nodes, cpus_per_replica, gpu) >= n_replicas:
        return nodes
    if request is None:
        from ray.autoscaler.sdk import request_resources as request
    bundle = {"CPU": cpus_per_replica, **({"GPU": 1} if gpu else {})}
    request(bundles=[bundle] * n_replicas)
    say(f"waiting for the autoscaler: {n_replicas} replica(s) x {bundle} (the cluster has room for "
        f"{replica_slots(nodes, cpus_per_replica, gpu)})")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sleep(5.0)
        nodes = nodes_fn()
        if replica_slots(nodes, cpus_per_replica, gpu) >= n_replicas:
            return nodes
    raise ClusterUnreachable(
        f"after {timeout_s:.0f} s the cluster holds {replica_slots(nodes, cpus_per_replica, gpu)} of {n_replicas} "
        f"replica(s) of {bundle} — raise max_workers in cluster.yaml, check `ray status`, or lower concurrency")


def default_placement(free_cpus: float, num_actors: int, cpus_per_actor: float | None,
                      threads_per_actor: int | None) -> tuple[float, int]:
    """CPUs and kernel threads per actor: what was asked, else the free CPUs shared among the actors (at least 1
    each) and as many kernel threads as whole CPUs reserved — every core works on a trial without a shard leaving
    its actor."""
    cpus = cpus_per_actor if cpus_per_actor is not None else max(1.0, float(int(free_cpus) // max(num_actors, 1)))
    threads = threads_per_actor or max(1, int(cpus))
    return cpus, threads


def node_affinity(node_id: str | None) -> Any:
    """Ray's soft node-affinity strategy for ``node_id`` (``None``: Ray's default placement)."""
    if node_id is None:
        return None
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)


def driver_node() -> Any:
    """A hard affinity to this process's node (the driver's): for the search's small state actors."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)

