"""Running on a Ray cluster: connecting (``--address`` / ``RAY_ADDRESS``), placing store replicas per node,
submitting a search as a Ray job from a laptop, and the capacity model of docs/cluster.md."""

from searchmerge.cluster.connect import ClusterError, connect, resolve_address
from searchmerge.cluster.placement import NodeInfo, alive_nodes, replica_nodes

__all__ = ["ClusterError", "connect", "resolve_address", "NodeInfo", "alive_nodes", "replica_nodes"]
