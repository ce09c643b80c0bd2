"""Which store placement makes trials fastest for the cores a machine has: one actor using every core (kernel
threads), or one actor per core (shards split; the other actors' merged shards travel to the evaluation model).

    python benchmarks/bench_placement.py            # the 100M zoo of bench_trial.py, a new λ / density every trial
    python benchmarks/bench_placement.py --small    # its 10M zoo

Each placement is a store built with ``TaskVectorStore.build(num_actors, cpus_per_actor, threads_per_actor)`` and an
evaluation model attached on its first actor (``merge_into``, as a search trial). The placements run one after the
other in the same process (one store at a time: each holds the whole zoo); ratios are against ``1 actor x 1 thread``.
``default`` is what ``build`` picks when neither ``cpus_per_actor`` nor ``threads_per_actor`` is given.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trial import DENSITIES, LAMBDAS, open_zoo  # noqa: E402
from searchmerge.recipe import recipe_from_dict  # noqa: E402

#: (label, num_actors, cpus_per_actor, threads_per_actor); None = the build's default
PLACEMENTS = [
    ("1 actor x 1 thread", 1, 1.0, 1),
    ("2 actors x 1 thread", 2, 1.0, 1),
    ("1 actor x 2 threads", 1, 2.0, 2),
    ("default", 1, None, None),
]


def recipes(base: Path, fts: list[Path]) -> dict[str, Callable[[int], object]]:
    """Trial i's recipe per row: a new λ (task arithmetic), a new density (TIES per tensor, DARE-TIES)."""
    def ta(i: int) -> object:
        return recipe_from_dict({"method": "task_arithmetic", "base_model": str(base), "seed": 0,
                                 "models": [{"model": str(f)} for f in fts],
                                 "parameters": {"lambda": LAMBDAS[i % len(LAMBDAS)]}})

    def dens(method: str, i: int, shift: float, **p) -> object:
        d = DENSITIES[i % len(DENSITIES)] + shift
        return recipe_from_dict({"method": method, "base_model": str(base), "seed": 0,
                                 "models": [{"model": str(f), "parameters": {"density": d}} for f in fts],
                                 "parameters": {"lambda": LAMBDAS[i % len(LAMBDAS)], **p}})

    return {
        "task_arithmetic, new λ": ta,
        "ties (tensor), new density": lambda i: dens("ties", i, 0.0, merge_func="sum"),
        "dare_ties (inverse), new density": lambda i: dens("dare_ties", i, 0.3, rescale="inverse"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="10M-parameter zoo")
    ap.add_argument("--zoo", default=None, help="zoo folder (as bench_trial.py)")
    ap.add_argument("--trials", type=int, default=None, help="timed trials per row and placement")
    args = ap.parse_args()
    trials = args.trials or (4 if args.small else 7)
    torch.set_num_threads(1)

    import ray
    from transformers import AutoModelForCausalLM

    from searchmerge.cluster.placement import default_placement
    from searchmerge.store import TaskVectorStore

    base, fts = open_zoo(args.zoo, args.small)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    times: dict[tuple[str, str], list[float]] = {}
    try:
        rows = recipes(base, fts)
        for label, n, cpus, threads in PLACEMENTS:  # one store at a time: each holds the whole zoo
            s = TaskVectorStore.build(base, fts, num_actors=n, cpus_per_actor=cpus, threads_per_actor=threads)
            ev = s.attach_evaluator(functools.partial(AutoModelForCausalLM.from_pretrained, base))
            for row, make in rows.items():
                s.merge_into(make(0), ev)  # cold: kernels, order statistics
                for i in range(1, trials + 1):
                    t0 = time.perf_counter()
                    s.merge_into(make(i), ev)
                    times.setdefault((row, label), []).append(time.perf_counter() - t0)
            print(f"{label}: done", flush=True)
            s.close()
            deadline = time.time() + 60  # killed actors hand their CPUs back asynchronously
            while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
                time.sleep(0.2)
    finally:
        ray.shutdown()
    ref = PLACEMENTS[0][0]
    dc, dt = default_placement(float(os.cpu_count()), 1, None, None)
    print(f"default on this machine: 1 actor, {dc:g} CPU(s), {dt} kernel thread(s)")
    print(f"\nzoo {base.parent}, {len(fts)} fine-tuned; {os.cpu_count()} cores; median of {trials} trials; "
          f"ratio = time / ({ref})\n")
    print("| row | " + " | ".join(p[0] for p in PLACEMENTS) + " |")
    print("|---|" + "---|" * len(PLACEMENTS))
    for row in rows:
        med = {p[0]: statistics.median(times[(row, p[0])]) for p in PLACEMENTS}
        print(f"| {row} | " + " | ".join(f"{med[p[0]] * 1e3:.0f} ms ({med[p[0]] / med[ref]:.2f})"
                                         for p in PLACEMENTS) + " |")


if __name__ == "__main__":
    main()
