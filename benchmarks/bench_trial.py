"""Per-trial latency of a merge search: searchmerge's own file-merge loops (the patterns of FusionBench's and
MergeKit-evolve's search loops) against the resident store, with a new λ, new weights or a new density every trial.

    python benchmarks/bench_trial.py            # a generated 100M-parameter GPT-2 zoo, 4 fine-tuned models
    python benchmarks/bench_trial.py --small    # a 10M zoo, for a quick check
    python benchmarks/bench_trial.py --zoo DIR  # DIR/base + the other model folders in DIR (e.g. Llama), never deleted

Baselines (searchmerge code in the peers' loop patterns, not the peers themselves):
(a) reload per trial (FusionBench's loop): the merge core reads every checkpoint, merges, and the model is built with
    ``from_pretrained`` + ``load_state_dict`` of the merged weights;
(b) merge to disk (MergeKit-evolve's loop): ``merge(recipe, out=dir)`` then ``from_pretrained(dir)``;
(mk) with ``--mergekit-yaml PATH`` (MergeKit installed in another environment), the real ``mergekit-yaml`` run per
    trial on the same recipe (its whole process: start, load, merge, write), for the rows MergeKit can express;
(fb) with ``--fusionbench-python PATH`` (fusion-bench installed in another environment), FusionBench's own
    ``TaskArithmeticAlgorithm`` / ``TiesMergingAlgorithm`` (whole-model trim) on the models loaded once: its merge
    alone, a lower bound for its loop (``benchmarks/fusionbench_trial.py``).
(c) the resident store: ``TaskVectorStore.merge_into(recipe, evaluator)`` into a model that lives on the store's actor
    (1 actor; ``threads`` kernel threads): no disk, no re-instantiation.

Each row says what changes every trial (λ; per-model weights; density; a 3-knot depth gradient of density or weight,
MergeKit's list syntax, resolved per tensor inside the same fused passes). ``--rows WORDS`` runs a subset. Its bound is the bytes that row's trial
must touch divided by the copy bandwidth measured right before the row (the shared machine's bandwidth drifts):
task arithmetic reads θ₀ and the N task vectors and writes the model; a cached unit-weight TIES trial (new λ) reads
θ₀ and the cached merged delta and writes the model (three streams); a new TIES / breadcrumbs density takes one
flagged fused pass (the cuts' histogram bins from order statistics; the bins' entries, ≈0.2–1%, listed as the pass
goes and recomputed): task arithmetic's bytes; DARE draws its masks inside the fused pass (task arithmetic's bytes), plus for ``rescale: l1``
one more read of each τ (its masked |τ| summed in torch's order as it is read, ``store/torchsum.py``); DELLA draws
its masks the same way against probabilities from each τ's within-row magnitude ranks (sorted once, on the first
trial; 2 bytes an entry): task arithmetic's bytes plus the ranks (and for ``rescale: l1`` a second read of τ and
ranks). The ratio column ``(c)/TA`` compares each row with the
task-arithmetic row of the same thread count, same run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from searchmerge.merge import merge as core_merge  # noqa: E402
from searchmerge.recipe import recipe_from_dict  # noqa: E402
from searchmerge.synthetic import make_synthetic_zoo  # noqa: E402

LAMBDAS = [0.3, 0.35, 0.25, 0.4, 0.2, 0.45, 0.3, 0.32, 0.38, 0.27, 0.42, 0.22, 0.33, 0.29]
DENSITIES = [0.2, 0.27, 0.13, 0.35, 0.18, 0.42, 0.09, 0.31, 0.24, 0.16, 0.38, 0.22, 0.11, 0.29]  # all different


@dataclass(frozen=True)
class Row:
    name: str  # method and scope
    changes: str  # what is new in every trial
    family: str  # rows of one family share their baselines (a)/(b)
    recipe: Callable[[int], dict]  # trial i's recipe data
    reads: Callable[[int, int, int], float]  # bytes a trial touches, from (P, N, task-vector bytes per entry)
    threads: int = 1
    trials: int | None = None  # fewer for slow rows
    mergekit: bool = False  # MergeKit can express the recipe


def _models(fts: list[Path], weights: list[float] | None = None, density: list[float] | None = None) -> list[dict]:
    out = []
    for i, d in enumerate(fts):
        params = {}
        if weights is not None:
            params["weight"] = weights[i]
        if density is not None:
            params["density"] = density[i]
        out.append({"model": str(d), **({"parameters": params} if params else {})})
    return out


def rows(base: Path, fts: list[Path], threads: list[int]) -> list[Row]:
    n = len(fts)

    def r(method: str, i: int, weights=None, density=None, seed: int = 0, **params) -> dict:
        return {"method": method, "base_model": str(base), "models": _models(fts, weights, density), "seed": seed,
                "parameters": {"lambda": LAMBDAS[i], **params}}

    def new_weights(i: int) -> list[float]:
        return [round((0.3 + 0.1 * m) * (1 + 0.05 * i), 4) for m in range(n)]

    def new_densities(i: int) -> list[float]:
        return [DENSITIES[(i + m) % len(DENSITIES)] for m in range(n)]

    def gradient(i: int, shift: float = 0.0) -> list[list[float]]:
        """A new 3-knot depth gradient every trial (MergeKit's list syntax), the same for every model."""
        return [[DENSITIES[(i + j) % len(DENSITIES)] + shift for j in range(3)]] * n

    ta = lambda p, k, b: (8 + k * b) * p  # noqa: E731 - read θ₀, read N τ, write the model
    flagged = ta  # one flagged fused pass (its listing of the cuts' bins, ≈0.2–1% of the entries, not counted)
    cached = lambda p, k, b: 12 * p  # noqa: E731 - read θ₀ and the cached merged delta, write the model
    l1 = lambda p, k, b: (8 + 2 * k * b) * p  # noqa: E731 - + per model: a read of τ summing |τ·mask| in torch's order
    ranked = lambda p, k, b: (8 + k * (b + 2)) * p  # noqa: E731 - DELLA: task arithmetic's + each τ's ranks (uint16)
    ranked_l1 = lambda p, k, b: (8 + 2 * k * (b + 2)) * p  # noqa: E731 - + per model: a read of τ and its ranks
    out = []
    for t in threads:
        out += [
            Row("task_arithmetic", "λ", "ta", lambda i: r("task_arithmetic", i), ta, t, mergekit=True),
            Row("ties (tensor)", "density", "ties_tensor",
                lambda i: r("ties", i, density=[DENSITIES[i]] * n, merge_func="sum"), flagged, t, mergekit=True),
            Row("dare_ties (tensor), rescale inverse", "density", "dare_ties",
                lambda i: r("dare_ties", i, density=[DENSITIES[i] + 0.3] * n, rescale="inverse"), ta, t),
            Row("della, rescale inverse", "density", "della",
                lambda i: r("della", i, density=[DENSITIES[i] + 0.3] * n, epsilon=0.1, rescale="inverse"), ranked, t),
            Row("della, rescale l1", "density", "della",
                lambda i: r("della", i, density=[DENSITIES[i] + 0.3] * n, epsilon=0.1, rescale="l1"), ranked_l1, t,
                mergekit=True),
        ]
    out += [
        Row("ties (tensor)", "λ (density .2)", "ties_tensor", lambda i: r("ties", i, density=[0.2] * n, merge_func="sum"),
            cached),
        Row("ties (tensor)", "density gradient (3 knots)", "ties_tensor",
            lambda i: r("ties", i, density=gradient(i), merge_func="sum"), flagged, mergekit=True),
        Row("task_arithmetic", "weight gradient (3 knots)", "ta",
            lambda i: r("task_arithmetic", i, weights=[[w * 3 for w in g] for g in gradient(i)]), ta, mergekit=True),
        Row("ties (tensor, weighted)", "weights + per-model density", "ties_tensor",
            lambda i: r("ties", i, weights=new_weights(i), density=new_densities(i)), flagged, mergekit=True),
        Row("ties (model)", "density", "ties_model",
            lambda i: r("ties", i, density=[DENSITIES[i]] * n, merge_func="sum", trim_scope="model"), flagged),
        Row("breadcrumbs_ties", "density", "breadcrumbs",
            lambda i: r("breadcrumbs_ties", i, density=[DENSITIES[i] + 0.3] * n, gamma=0.01), flagged,
            mergekit=True),
        Row("dare_ties (tensor), rescale inverse", "seed (density .5)", "dare_ties",
            lambda i: r("dare_ties", i, density=[0.5] * n, rescale="inverse", seed=i), ta),
        Row("dare_ties (tensor), rescale inverse", "density gradient (3 knots)", "dare_ties",
            lambda i: r("dare_ties", i, density=gradient(i, 0.3), rescale="inverse"), ta),
        Row("dare_ties (tensor), rescale l1", "density", "dare_ties",
            lambda i: r("dare_ties", i, density=[DENSITIES[i] + 0.3] * n, rescale="l1"), l1, mergekit=True),
    ]
    out += [
        Row("della, rescale inverse", "seed (density .5)", "della",
            lambda i: r("della", i, density=[0.5] * n, epsilon=0.1, rescale="inverse", seed=i), ranked),
        Row("della_linear, rescale inverse", "density gradient (3 knots)", "della",
            lambda i: r("della_linear", i, density=gradient(i, 0.3), epsilon=0.05, rescale="inverse"), ranked),
    ]
    return out


def select_rows(all_rows: list[Row], words: str | None) -> list[Row]:
    """The rows a ``--rows`` filter names, and the task-arithmetic λ rows every ratio is taken against."""
    if not words:
        return all_rows
    keys = [w.strip() for w in words.split(",") if w.strip()]
    return [r for r in all_rows if (r.family == "ta" and r.changes == "λ")
            or any(k in f"{r.name}, {r.changes}" for k in keys)]


def copy_bandwidth(nbytes: int = 256 * 1024**2) -> float:
    """Bytes per second moved (read + write) by torch copy_ of a large float32 buffer."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / min(times)


def timed(fn: Callable[[int], object], n: int, first: int = 0) -> list[float]:
    out = []
    for i in range(first, first + n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def open_zoo(arg: str | None, small: bool) -> tuple[Path, list[Path]]:
    """The script's own generated zoo (built, or reused when its marker matches), or a folder set given with --zoo:
    ``DIR/base`` plus every other model folder in DIR. A folder the script did not generate is never modified."""
    n_params = 10_000_000 if small else 100_000_000
    root = Path(arg or f"/tmp/searchmerge-store-zoo{'-small' if small else ''}")
    marker = root / "zoo.json"
    if root.exists() and not marker.is_file():
        base = root / "base"
        fts = sorted(d for d in root.iterdir() if d.is_dir() and d != base and (d / "config.json").is_file())
        if not (base / "config.json").is_file() or not fts:
            raise SystemExit(f"--zoo {root}: expected {base} and at least one other model folder (with config.json)")
        return base, fts
    if marker.is_file() and json.loads(marker.read_text()).get("n_params") != n_params:
        raise SystemExit(f"--zoo {root} holds a generated zoo of another size: pass another folder (or --small)")
    return make_synthetic_zoo(root, n_params=n_params, n_models=4)


def mergekit_trial(exe: str, data: dict, tmp: Path) -> None:
    """One ``mergekit-yaml`` run on the recipe (its own process), output deleted after."""
    from searchmerge.mergekit import to_mergekit_yaml

    cfg = tmp / "mk.yaml"
    cfg.write_text(to_mergekit_yaml(recipe_from_dict(data)))
    subprocess.run([exe, str(cfg), str(tmp / "mk-out"), "--random-seed", "0"], check=True, capture_output=True)
    shutil.rmtree(tmp / "mk-out", ignore_errors=True)


def fusionbench_times(python: str, base: Path, fts: list[Path], trials: int) -> dict[tuple[str, str], float]:
    """FusionBench 0.2.x's own TaskArithmeticAlgorithm / TiesMergingAlgorithm (whole-model trim) on the zoo, models
    loaded once (merge only), run in its environment; keyed by the rows they compare with."""
    script = Path(__file__).resolve().parent / "fusionbench_trial.py"
    out = subprocess.run([python, str(script), str(base), *map(str, fts), "--trials", str(trials)], check=True,
                         capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    print(f"FusionBench {res['fusion_bench']}: task arithmetic {res['task_arithmetic']:.2f} s, "
          f"TIES (model) {res['ties_model']:.2f} s per merge", flush=True)
    return {("task_arithmetic", "λ"): res["task_arithmetic"], ("ties (model)", "density"): res["ties_model"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="10M-parameter zoo, fewer trials")
    ap.add_argument("--zoo", default=None, help="zoo folder: generated here (reused) or DIR/base + model folders")
    ap.add_argument("--trials", type=int, default=None, help="timed trials per resident row")
    ap.add_argument("--baseline-trials", type=int, default=None, help="timed trials per baseline")
    ap.add_argument("--threads", default="1,2", help="kernel threads of the store's actor, one row set per value")
    ap.add_argument("--no-baselines", action="store_true", help="resident rows only")
    ap.add_argument("--mergekit-yaml", default=None, help="MergeKit's mergekit-yaml executable (another venv)")
    ap.add_argument("--fusionbench-python", default=None,
                    help="the Python of an environment with fusion-bench installed: FusionBench's own merge timed "
                         "(benchmarks/fusionbench_trial.py) for the task-arithmetic and whole-model TIES rows")
    ap.add_argument("--rows", default=None,
                    help="only the rows whose 'method, new every trial' contains one of these comma-separated words "
                         "(the task-arithmetic λ rows always run: every ratio is against them)")
    args = ap.parse_args()
    trials = args.trials or (3 if args.small else 9)
    btrials = args.baseline_trials or (1 if args.small else 2)
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(1)

    import ray
    from transformers import AutoModelForCausalLM

    from searchmerge.store import TaskVectorStore

    t0 = time.perf_counter()
    base, fts = open_zoo(args.zoo, args.small)
    print(f"zoo: {base.parent} ({len(fts)} fine-tuned; {time.perf_counter() - t0:.1f} s)", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench_trial_"))
    stores: dict[int, tuple] = {}
    baselines: dict[str, tuple[float, float]] = {}  # per family: (a), (b)
    mks: dict[tuple[str, str], float] = {}  # per row MergeKit can express: the real mergekit-yaml run
    fbs = fusionbench_times(args.fusionbench_python, base, fts, btrials) if args.fusionbench_python else {}
    results = []
    try:
        for t in threads:
            t0 = time.perf_counter()
            s = TaskVectorStore.build(base, fts, num_actors=1, cpus_per_actor=1, threads_per_actor=t)
            ev = s.attach_evaluator(functools.partial(AutoModelForCausalLM.from_pretrained, base))
            stores[t] = (s, ev)
            print(f"store ({t} thread(s)): built in {time.perf_counter() - t0:.1f} s", flush=True)
        s0 = stores[threads[0]][0]
        P, N = s0.n_params, s0.n_models
        for row in select_rows(rows(base, fts, threads), args.rows):
            if row.threads not in stores:  # the single-thread rows, with --threads naming other counts only
                continue
            if row.family not in baselines and not args.no_baselines:
                data = row.recipe

                def fusionbench(i: int) -> None:
                    merged = core_merge(recipe_from_dict(data(i)))
                    AutoModelForCausalLM.from_pretrained(base).load_state_dict(merged, strict=False)

                def mergekit_loop(i: int) -> None:
                    out = core_merge(recipe_from_dict(data(i)), out=tmp / "merged", overwrite=True)
                    AutoModelForCausalLM.from_pretrained(out)
                    shutil.rmtree(out)

                a = statistics.median(timed(fusionbench, btrials))
                b = statistics.median(timed(mergekit_loop, btrials))
                baselines[row.family] = (a, b)
                print(f"{row.family}: (a) {a:.2f} s, (b) {b:.2f} s", flush=True)
            if args.mergekit_yaml and row.mergekit and (row.name, row.changes) not in mks:
                data = row.recipe
                mk = statistics.median(timed(lambda i: mergekit_trial(args.mergekit_yaml, data(i), tmp), btrials))
                mks[(row.name, row.changes)] = mk
                print(f"{row.name}, new {row.changes}: mergekit-yaml {mk:.2f} s", flush=True)
            s, ev = stores[row.threads]
            s.clear_cache()
            torch.set_num_threads(row.threads)  # the bandwidth those threads get now (the box drifts)
            bw = copy_bandwidth()
            torch.set_num_threads(1)
            t0 = time.perf_counter()
            s.merge_into(recipe_from_dict(row.recipe(0)), ev)
            cold = time.perf_counter() - t0
            n = row.trials or trials
            c = statistics.median(timed(lambda i: s.merge_into(recipe_from_dict(row.recipe(i)), ev), n, first=1))
            st = s.stats()
            res = dict(row=row, c=c, cold=cold, bw=bw, bound=row.reads(P, N, 4) / bw, n=n,
                       cache=st["cache_bytes"], order=sum(a.get("order_stats_bytes", 0) for a in st["actors"]),
                       resident=st["resident_bytes"], anon=max(a["rss_anon_bytes"] for a in st["actors"]))
            results.append(res)
            print(f"{row.name}, new {row.changes}, {row.threads} thread(s): (c) {c * 1e3:.0f} ms (cold {cold:.2f} s), "
                  f"bound {res['bound'] * 1e3:.0f} ms", flush=True)
        print_tables(results, baselines, mks, fbs, P, N, trials, btrials, base.parent)
    finally:
        for s, _ in stores.values():
            s.close()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def print_tables(results: list[dict], baselines: dict, mks: dict, fbs: dict, P: int, N: int, trials: int, btrials: int, zoo: Path) -> None:
    ta = {r["row"].threads: r["c"] for r in results if r["row"].family == "ta" and r["row"].changes == "λ"}
    print()
    print(f"zoo {zoo}: P = {P / 1e6:.1f}M parameters, N = {N} fine-tuned models, float32; baseline trials {btrials}, "
          f"resident trials {trials} (median; DARE rows fewer)")
    print()
    print("| method | new every trial | threads | (a) reload+merge+from_pretrained | (b) merge to disk + from_pretrained "
          "| mergekit-yaml | FusionBench merge | (c) resident merge_into | (c) first trial (cold) | (a)/(c) | (b)/(c) "
          "| mergekit/(c) | FusionBench/(c) | (c)/TA(c) "
          "| bound | (c)/bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        row = r["row"]
        a, b = baselines.get(row.family, (None, None))
        mk = mks.get((row.name, row.changes))
        fb = fbs.get((row.name, row.changes))
        fmt = lambda x: "" if x is None else f"{x:.2f} s"  # noqa: E731
        ratio = lambda x: "" if x is None else f"{x / r['c']:.1f}"  # noqa: E731
        print(f"| {row.name} | {row.changes} | {row.threads} | {fmt(a)} | {fmt(b)} | {fmt(mk)} | {fmt(fb)} | {r['c'] * 1e3:.0f} ms "
              f"| {r['cold']:.2f} s | {ratio(a)} | {ratio(b)} | {ratio(mk)} | {ratio(fb)} | {r['c'] / ta[row.threads]:.2f} "
              f"| {r['bound'] * 1e3:.0f} ms ({r['bw'] / 1e9:.0f} GB/s) | {r['c'] / r['bound']:.2f} |")
    print()
    print("| method | new every trial | threads | resident bytes | cache | order statistics | actor anon RSS |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        row = r["row"]
        print(f"| {row.name} | {row.changes} | {row.threads} | {r['resident'] / 1e9:.2f} GB | {r['cache'] / 1e6:.0f} MB "
              f"| {r['order'] / 1e6:.1f} MB | {r['anon'] / 1e9:.2f} GB |")


if __name__ == "__main__":
    main()
