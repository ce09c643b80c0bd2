"""Capacity model for a cluster search (docs/cluster.md): resident bytes per store replica, where a replica
fits on an 8x80 GB node, and trials/min versus nodes.

    python benchmarks/capacity.py                        # the tables in docs/cluster.md
    python benchmarks/capacity.py --merge-s 0.5 --eval-s 7 --model 7b --n 8 --dtype bf16

A replica is what one trial needs, all on one node (trials never copy weights across nodes):
  base θ₀ (P params) + N task vectors τ_i, in the residency dtype   = P·b·(1+N)
  + the mask / merged-delta cache at its bound (cache_fraction 0.2)  = 0.2·P·b·(1+N)
  + the resident evaluation model the recipe is merged into          = P·b
Activations and the CUDA context are left to the headroom (a GPU counts as 90 % of its memory).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False

    def params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim  # q, o; k, v (GQA)
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        per_layer = attn + mlp + 2 * self.hidden  # two RMSNorms
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + emb + self.hidden


PRESETS = {  # public configs: Llama-3.2-1B, Llama-2-7B, Llama-2-70B
    "1b": ModelShape("~1B (Llama-3.2-1B)", 2048, 16, 8192, 128256, 32, 8, tied=True),
    "7b": ModelShape("7B (Llama-2-7B)", 4096, 32, 11008, 32000, 32, 32),
    "70b": ModelShape("70B (Llama-2-70B)", 8192, 80, 28672, 32000, 64, 8),
}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Node:
    gpus: int = 8
    gpu_gb: float = 80.0
    host_gb: float = 1000.0
    usable: float = 0.9

    @property
    def gpu_bytes(self) -> float:
        return self.gpu_gb * GB * self.usable


def replica_bytes(params: int, n: int, dtype: str, cache_fraction: float = 0.2) -> float:
    b = DTYPE_BYTES[dtype]
    store = params * b * (1 + n)
    return store * (1 + cache_fraction) + params * b


def placement(nbytes: float, node: Node) -> tuple[str, float]:
    """Where one replica fits on ``node``, and how many replicas the node holds (a fraction: one replica would
    span several nodes). Marked ``*``: the store supports it (``num_actors`` = GPUs) but ``searchmerge search``
    builds one actor per replica today; ``(!)``: not supported (trials would move merged shards across nodes)."""
    gpus = math.ceil(nbytes / node.gpu_bytes)
    if gpus == 1:
        return "1 GPU", float(node.gpus)
    if gpus <= node.gpus:  # sharded over `gpus` GPUs of one node: TaskVectorStore.build(num_actors=gpus)
        return f"{gpus} GPUs*", float(node.gpus // gpus)
    host = node.host_gb * GB * node.usable
    if nbytes <= host:
        return f"host ({node.host_gb / 1000:g} TB)", float(host // nbytes)
    nodes = math.ceil(nbytes / (node.gpus * node.gpu_bytes))
    return f"{nodes} nodes (!)", 1.0 / nodes


def _per_node(x: float) -> str:
    return f"{x:g}" if x >= 1 else f"1/{round(1 / x)}"


def capacity_table(n_values: list[int], dtypes: list[str], host_gb: list[float]) -> str:
    lines = ["| model | params | dtype | N | replica GB | fits (1 TB host) | replicas / node | fits (2 TB host) | "
             "replicas / node |", "|---|---|---|---|---|---|---|---|---|"]
    for shape in PRESETS.values():
        p = shape.params()
        for dtype in dtypes:
            for n in n_values:
                nb = replica_bytes(p, n, dtype)
                cells = " | ".join(f"{w} | {_per_node(k)}" for w, k in (placement(nb, Node(host_gb=h)) for h in host_gb))
                lines.append(f"| {shape.name} | {p / 1e9:.2f}B | {dtype} | {n} | {nb / GB:,.0f} | {cells} |")
    return "\n".join(lines)


def throughput_table(model: str, n: int, dtype: str, merge_s: float, eval_s: float, nodes: list[int],
                     host_gb: float = 1000.0) -> str:
    """Concurrency = replicas the nodes hold (each runs one trial at a time); trials/min = concurrency·60/(merge+eval)."""
    shape = PRESETS[model]
    nb = replica_bytes(shape.params(), n, dtype)
    where, per_node = placement(nb, Node(host_gb=host_gb))
    trial_s = merge_s + eval_s
    lines = [f"{shape.name}, N={n}, {dtype}: {nb / GB:,.0f} GB per replica, {where}; {trial_s:g} s per trial "
             f"(merge {merge_s:g} s + evaluation {eval_s:g} s)", "",
             "| nodes | concurrent trials | trials / min |", "|---|---|---|"]
    for k in nodes:
        conc = math.floor(k * per_node)
        lines.append(f"| {k} | {conc} | {conc * 60 / trial_s:,.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(PRESETS), default=None, help="throughput for this model only")
    ap.add_argument("--n", type=int, default=8, help="task vectors in the throughput table")
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    ap.add_argument("--host-gb", type=float, default=1000.0, help="host memory per node in the throughput table")
    ap.add_argument("--merge-s", type=float, default=0.5,
                    help="measured merge seconds per trial (default: task arithmetic on the text zoo, README)")
    ap.add_argument("--eval-s", type=float, default=7.0,
                    help="measured evaluation seconds per trial (default: a full text-zoo validation pass, README)")
    args = ap.parse_args()
    print(capacity_table([2, 4, 8, 16], ["fp32", "bf16", "fp16"], [1000.0, 2000.0]))
    for model in [args.model] if args.model else list(PRESETS):
        print()
        print(throughput_table(model, args.n, args.dtype, args.merge_s, args.eval_s, [1, 2, 4, 8, 16], args.host_gb))


if __name__ == "__main__":
    main()
