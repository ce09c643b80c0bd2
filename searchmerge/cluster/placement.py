"""Which node holds which store replica: one replica per node that can host it, round-robin, counted from
the cluster (``ray.nodes()``), never from this machine's ``torch.cuda.device_count()``.

A replica is a whole resident store (θ₀ and every task vector, plus its evaluation model): trials that use
it never copy weights across nodes. Affinity is *soft*, so a replica whose node is lost restarts on another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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

