"""Per-trial latency of a merge search: reload-per-trial (FusionBench), merge-to-disk (MergeKit-evolve), resident store.

    python benchmarks/bench_trial.py            # the 100M-parameter zoo, 4 fine-tuned models
    python benchmarks/bench_trial.py --small    # a 10M zoo, for a quick check

(a) FusionBench's search: every trial reloads the checkpoints, merges (the merge core) and builds the model with
    ``from_pretrained`` (+ ``load_state_dict`` of the merged weights).
(b) MergeKit-evolve: every trial writes the merge to disk (``merge(recipe, out=dir)``) and reloads it with
    ``from_pretrained``.
(c) searchmerge's resident path: ``TaskVectorStore.merge_into(recipe, evaluator)`` into a model that lives on the
    store's actor (1 actor, 1 torch thread): no disk, no re-instantiation. Every path runs 1 torch thread.

Each timed trial uses a new λ (and, for the weighted row, new per-model weights): a real new trial; density is
fixed as in a coefficient search, so the store's mask cache hits after the first trial (its cold time is printed
separately). The bound for (c) is the bytes a merge must touch (read θ₀ and the N task vectors, plus the N
bit-packed masks for the TIES family, write the merged weights) divided by the copy bandwidth measured with
``torch`` ``copy_`` of a large buffer right before that row's trials (the shared machine's bandwidth drifts).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from searchmerge.merge import merge as core_merge  # noqa: E402
from searchmerge.recipe import recipe_from_dict  # noqa: E402
from searchmerge.synthetic import make_synthetic_zoo  # noqa: E402

LAMBDAS = [0.3, 0.35, 0.25, 0.4, 0.2, 0.45, 0.3, 0.32, 0.38, 0.27, 0.42, 0.22]  # one per trial (9 resident + cold)


def recipes(base: Path, fts: list[Path]) -> dict[str, dict]:
    models = [{"model": str(d)} for d in fts]

    def r(method: str, weights: list[float] | None = None, **params):
        ms = models if weights is None else [{**m, "parameters": {"weight": w}} for m, w in zip(models, weights)]
        return {"method": method, "base_model": str(base), "models": ms, "parameters": params}

    return {
        "task_arithmetic": r("task_arithmetic", **{"lambda": 0.3}),
        "ties (tensor)": r("ties", density=0.2, merge_func="sum", trim_scope="tensor", **{"lambda": 0.3}),
        "ties (model)": r("ties", density=0.2, merge_func="sum", trim_scope="model", **{"lambda": 0.3}),
        # per-model weights != 1 that change every trial: masks are cached, the sign election runs per trial
        "ties (tensor, weighted)": r("ties", weights=[0.3, 0.4, 0.5, 0.6], density=0.2, merge_func="sum",
                                    trim_scope="tensor", **{"lambda": 0.3}),
        "dare_ties (model)": r("dare_ties", density=0.5, rescale="inverse", trim_density=0.2, trim_scope="model",
                               merge_func="sum", **{"lambda": 0.3}),
    }


def with_lambda(data: dict, lam: float):
    return recipe_from_dict({**data, "parameters": {**data["parameters"], "lambda": lam}})


def trial_recipe(data: dict, i: int):
    """Trial ``i``: its own λ and, for a recipe with per-model weights, its own weights (nothing carries over)."""
    models = [
        {**m, "parameters": {"weight": round(m["parameters"]["weight"] * (1 + 0.05 * i), 4)}} if "parameters" in m else m
        for m in data["models"]
    ]
    return with_lambda({**data, "models": models}, LAMBDAS[i])


def copy_bandwidth(nbytes: int = 512 * 1024**2) -> float:
    """Bytes per second moved (read + write) by torch copy_ of a large float32 buffer."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / min(times)


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="10M-parameter zoo, fewer trials")
    ap.add_argument("--zoo", default=None, help="zoo cache folder")
    ap.add_argument("--trials", type=int, default=None, help="timed trials per resident row")
    ap.add_argument("--baseline-trials", type=int, default=None, help="timed trials per baseline row")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every path (1: two threads stall each other on a busy 2-core box)")
    args = ap.parse_args()
    n_params = 10_000_000 if args.small else 100_000_000
    trials = args.trials or (3 if args.small else 9)
    btrials = args.baseline_trials or (1 if args.small else 2)
    zoo_dir = Path(args.zoo or f"/tmp/searchmerge-store-zoo{'-small' if args.small else ''}")
    torch.set_num_threads(args.threads)

    import ray
    from transformers import AutoModelForCausalLM

    from searchmerge.store import TaskVectorStore

    t0 = time.perf_counter()
    base, fts = make_synthetic_zoo(zoo_dir, n_params=n_params, n_models=4)
    print(f"zoo: {zoo_dir} ({time.perf_counter() - t0:.1f} s)", flush=True)
    bw = copy_bandwidth()  # same thread count as the store's actor
    print(f"copy bandwidth: {bw / 1e9:.2f} GB/s (read+write, torch copy_, {args.threads} threads)", flush=True)
    # two stores (fp32 and bf16 residency) each hold one actor that runs `threads` torch threads; only one works at a time
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench_trial_"))
    rows = []
    try:
        stores = {}
        for res in ("float32", "bfloat16"):
            t0 = time.perf_counter()
            s = TaskVectorStore.build(base, fts, num_actors=1, cpus_per_actor=1, threads_per_actor=args.threads,
                                      residency_dtype=res)
            ev = s.attach_evaluator(functools.partial(AutoModelForCausalLM.from_pretrained, base))
            print(f"store ({res}): built in {time.perf_counter() - t0:.1f} s", flush=True)
            stores[res] = (s, ev)
        s32 = stores["float32"][0]
        P, N = s32.n_params, s32.n_models
        for name, data in recipes(base, fts).items():
            ties_family = name != "task_arithmetic"

            def fusionbench(i, data=data):
                merged = core_merge(trial_recipe(data, i))
                model = AutoModelForCausalLM.from_pretrained(base)
                model.load_state_dict(merged, strict=False)

            def mergekit(i, data=data):
                out = core_merge(trial_recipe(data, i), out=tmp / "merged", overwrite=True)
                AutoModelForCausalLM.from_pretrained(out)
                shutil.rmtree(out)

            a = statistics.median(timed(fusionbench, btrials))
            print(f"{name}: (a) {a:.2f} s", flush=True)
            b = statistics.median(timed(mergekit, btrials))
            print(f"{name}: (b) {b:.2f} s", flush=True)
            for res, (s, ev) in stores.items():
                res_bytes = 2 if res == "bfloat16" else 4
                touched = P * 4 + N * P * res_bytes + P * 4 + (N * P / 8 if ties_family else 0)
                row_bw = copy_bandwidth(256 * 1024**2)  # this moment's bandwidth: the shared box drifts by ±50%
                bound = touched / row_bw
                s.clear_cache()
                t0 = time.perf_counter()
                s.merge_into(trial_recipe(data, 0), ev)
                cold = time.perf_counter() - t0
                c = statistics.median(timed(lambda i, data=data, s=s, ev=ev: s.merge_into(trial_recipe(data, i + 1), ev), trials))
                err = None
                if res == "bfloat16":
                    ref = s32.merge(with_lambda(data, 0.3))
                    got = s.merge(with_lambda(data, 0.3))
                    err = max((got[k].float() - ref[k].float()).abs().max().item() for k in ref if ref[k].is_floating_point())
                    scale = max(ref[k].float().abs().max().item() for k in ref if ref[k].is_floating_point())
                    err = (err, scale)
                st = s.stats()
                rows.append(dict(method=name, res=res, a=a, b=b, c=c, cold=cold, bound=bound, bw=row_bw, err=err,
                                 rss=st["peak_rss_bytes"], anon=max(a["rss_anon_bytes"] for a in st["actors"]),
                                 resident=st["resident_bytes"], cache=st["cache_bytes"],
                                 ev=st["evaluator_bytes"], limit=st["bound_bytes"]))
                print(f"{name} [{res}]: (c) {c * 1e3:.0f} ms (cold {cold:.2f} s), bound {bound * 1e3:.0f} ms", flush=True)
        print()
        print(f"P = {P / 1e6:.1f}M parameters, N = {N} fine-tuned models; copy bandwidth {bw / 1e9:.2f} GB/s; "
              f"torch threads {args.threads}; baseline trials {btrials}, resident trials {trials} (median)")
        print()
        print("| method | residency | (a) reload+merge+from_pretrained | (b) merge to disk + from_pretrained "
              "| (c) resident merge_into | (c) first trial (cold cache) | (a)/(c) | (b)/(c) | copy bandwidth "
              "| bandwidth bound | (c)/bound |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['res']} | {r['a']:.2f} s | {r['b']:.2f} s | {r['c'] * 1e3:.0f} ms | "
                  f"{r['cold']:.2f} s | {r['a'] / r['c']:.1f} | {r['b'] / r['c']:.1f} | {r['bw'] / 1e9:.1f} GB/s | "
                  f"{r['bound'] * 1e3:.0f} ms | "
                  f"{r['c'] / r['bound']:.2f} |")
        print()
        print("| method | residency | resident bytes | mask cache | co-located eval model | actor anon RSS now | "
              "actor peak RSS (incl. mmap'd checkpoints) | 1.2·(N+1)·P·4 | bf16 max abs err (vs fp32 residency) / max |w| |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            err = "" if r["err"] is None else f"{r['err'][0]:.2e} / {r['err'][1]:.2f}"
            print(f"| {r['method']} | {r['res']} | {r['resident'] / 1e9:.2f} GB | {r['cache'] / 1e6:.0f} MB | "
                  f"{r['ev'] / 1e9:.2f} GB | {r['anon'] / 1e9:.2f} GB | {r['rss'] / 1e9:.2f} GB | {r['limit'] / 1e9:.2f} GB | {err} |")
    finally:
        for s, _ in locals().get("stores", {}).values():
            s.close()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
