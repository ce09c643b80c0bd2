"""FusionBench's own merge, timed per trial: run with the Python of an environment where ``fusion-bench`` is installed
(it is not a searchmerge dependency), by ``bench_trial.py --fusionbench-python PATH``:

    python3 -m venv /tmp/fb && /tmp/fb/bin/pip install -c constraints.txt torch==2.13.0 fusion-bench==0.2.33
    /tmp/fb/bin/python benchmarks/fusionbench_trial.py BASE_DIR FT_DIR [FT_DIR ...] --trials 2

The models are loaded once (``from_pretrained``) and handed to the algorithms as an in-memory pool, so the time is
FusionBench's merge alone (task vectors, trim, elect, disjoint merge, ``load_state_dict``): a lower bound for its
search loop, which also reloads. Each trial has a new scaling factor (task arithmetic) or a new density (TIES, whole
model: FusionBench's ``threshold``); the pretrained weights are restored, untimed, before each (the algorithms write
the merge into the pretrained model). Prints one JSON object: seconds per trial, median.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

LAMBDAS = [0.3, 0.35, 0.25, 0.4, 0.2, 0.45]
DENSITIES = [0.2, 0.27, 0.13, 0.35, 0.18, 0.42]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--trials", type=int, default=2)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(args.base)
    saved = {k: v.clone() for k, v in base.state_dict().items()}
    pool = {"_pretrained_": base, **{f"m{i}": AutoModelForCausalLM.from_pretrained(d) for i, d in enumerate(args.models)}}

    def timed(make) -> float:  # noqa: ANN001
        out = []
        for i in range(1, args.trials + 1):
            base.load_state_dict(saved)
            algo = make(i)
            t0 = time.perf_counter()
            algo.run(dict(pool))
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    res = {
        "task_arithmetic": timed(lambda i: TaskArithmeticAlgorithm(scaling_factor=LAMBDAS[i])),
        "ties_model": timed(lambda i: TiesMergingAlgorithm(scaling_factor=LAMBDAS[i], threshold=DENSITIES[i],
                                                           remove_keys=[], merge_func="sum")),
        "fusion_bench": __import__("importlib.metadata").metadata.version("fusion-bench"),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
