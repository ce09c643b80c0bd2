"""How close evaluation comes to its compute bound, on the default (text) zoo's validation split.

    python benchmarks/bench_eval.py                        # text zoo, validation, 1 thread, 3 repeats
    python benchmarks/bench_eval.py --threads 2 --batch-size 128     # other settings

One process, one model (task arithmetic λ = 0.3 of the zoo's fine-tunes), the same data for every row:

* **bound**: forward FLOPs of the split at every example's real token count (``FlopCounterMode`` on the model's
  own forward, attention included, embedding lookups excluded) over the ``torch.mm`` rate measured here on the
  model's own linear shapes at the same thread count;
* **(i) plain loop**: what a user writes — each task's ``…ForSequenceClassification`` model, the tokenizer
  called per batch of 32, padded to the maximum length, ``torch.no_grad``;
* **(ii) in-process evaluator** (:class:`~searchmerge.bench.evaluators.LocalEvaluator`): features tokenised once
  (disk cache), length-bucketed batches, ``inference_mode``, weights copied in place per candidate;
* **(iii) Ray Data + long-lived actors** (:class:`~searchmerge.bench.evaluators.RayEvaluator`): 1 actor with the
  same threads (the ratio to (ii)), and ``--actors`` actors x 1 thread (scale-out); per-call overhead = wall
  time not spent in the busiest actor's forwards.

Repeats are interleaved (i, ii, iii, i, ii, iii, ...) so load from other jobs hits every row alike; each row
reports its fastest pass. Metrics must be identical across (ii) and (iii); (i) is reported beside them.
Results: a table on stdout and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def ta_model(bench: Any, lam: float = 0.3) -> Any:
    mp = bench.modelpool
    sd = {k: v + lam * sum(mp.finetuned[t][k] - v for t in bench.taskpool.names) if v.is_floating_point() else v
          for k, v in mp.base.items()}
    return mp.model(sd)


def metrics(taskpool: Any, split: str, tasks: list[str], chunks: Any) -> dict[str, float]:
    from searchmerge.bench.evaluate import _Scorer

    sc = _Scorer(taskpool, split, tasks)
    for t, idx, pred in chunks:
        sc.add(t, idx, pred)
    return sc.report(final=True)["per_task"]


def plain_loop(runner: Any, taskpool: Any, split: str, tasks: list[str], tokenizer: Any, max_len: int,
               batch: int = 32, device: str = "cpu") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(i): the loop a user writes — tokenise each batch, pad to the maximum length, the task's own model."""
    out = []
    with torch.no_grad():
        for t in tasks:
            model = runner.module._tasks[t]
            texts = [str(x) for x in taskpool.tasks[t].splits[split].inputs]
            for s in range(0, len(texts), batch):
                enc = tokenizer(texts[s:s + batch], padding="max_length", truncation=True, max_length=max_len,
                                return_tensors="pt")
                logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
                out.append((t, np.arange(s, min(s + batch, len(texts))), logits.argmax(-1).cpu().numpy()))
    return out


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", default="text", help="an embedded zoo (text, fixture, ...) or a bench spec path")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of (i), (ii) and the 1-actor (iii)")
    ap.add_argument("--actors", type=int, default=2, help="actors of the scale-out (iii) row (1 thread each)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda where there is a GPU")
    ap.add_argument("--out", default="runs/bench-eval")
    args = ap.parse_args()

    import ray

    from searchmerge.bench import load_bench
    from searchmerge.bench.evaluate import model_features
    from searchmerge.bench.evaluators import LocalEvaluator, RayEvaluator
    from searchmerge.bench.families import MAX_TOKENS
    from searchmerge.bench.flops import linear_shapes, matmul_rate, split_flops
    from searchmerge.bench.zoo import build_zoo

    torch.set_num_threads(args.threads)
    path = Path(args.bench) if Path(args.bench).exists() else build_zoo(args.bench)
    bench = load_bench(path)
    tp, tasks, split = bench.taskpool, bench.taskpool.names, args.split
    model = ta_model(bench)
    t_feat, (feats, _) = timed(lambda: model_features(model, tp, tasks, split))
    n_seq = sum(len(tp.tasks[t].splits[split]) for t in tasks)
    tokens = sum(int(feats[t]["attention_mask"].sum()) for t in tasks) if "attention_mask" in feats[tasks[0]] else 0
    t_build, local = timed(lambda: LocalEvaluator(model, feats, tasks, args.batch_size, 0, args.threads,
                                                          args.device))
    flops = sum(split_flops(local.runner.predict, feats, tasks).values())
    rows = args.batch_size * max(1, tokens // max(1, n_seq))
    rate = matmul_rate(linear_shapes(local.runner.module), rows, args.threads, device=args.device)
    bound_s = flops / rate
    print(f"{path.parent.name}: {n_seq} sequences, {tokens} real tokens ({tokens / max(1, n_seq):.1f} per sequence), "
          f"{flops / 1e9:.2f} GFLOP per pass; torch.mm on the model's shapes ({rows} rows, {args.threads} thread(s)): "
          f"{rate / 1e9:.1f} GFLOP/s -> bound {bound_s:.2f} s; features {t_feat:.2f} s (disk cache), "
          f"evaluator built in {t_build:.2f} s", flush=True)

    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    ray.init(num_cpus=max(2, args.actors), num_gpus=gpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    t_ray1, ray1 = timed(lambda: RayEvaluator(model, feats, tasks, args.batch_size, 0, 1, args.threads,
                                                        device=args.device))
    ray1_close = ray1.close
    paths: dict[str, Any] = {}
    tokenizer = None
    if hasattr(local.runner.module, "_tasks"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.base_folder)
        paths["(i) plain loop"] = lambda: plain_loop(local.runner, tp, split, tasks, tokenizer, MAX_TOKENS,
                                                       device=args.device)

    def run_local() -> Any:
        local.load(model.backbone)
        return list(local.iter_chunks())

    def run_ray(ev: Any) -> Any:
        ev.load(model.backbone)
        return list(ev.iter_chunks())

    paths["(ii) in-process evaluator"] = run_local
    paths["(iii) Ray Data, 1 actor"] = lambda: run_ray(ray1)
    best = {k: float("inf") for k in paths}
    results: dict[str, Any] = {}
    overhead = []
    for _ in range(args.repeats):
        for name, fn in paths.items():
            secs, chunks = timed(fn)
            if name.startswith("(iii)"):
                overhead.append(secs - max(ray1.busy_seconds()))
            best[name] = min(best[name], secs)
            results[name] = metrics(tp, split, tasks, chunks)
    ray1_close()
    t_rayn, rayn = timed(lambda: RayEvaluator(model, feats, tasks, args.batch_size, 0, args.actors, 1,
                                                        device=args.device))
    scale = f"(iii) Ray Data, {args.actors} actors x 1 thread"
    best[scale] = float("inf")
    for _ in range(args.repeats):
        secs, chunks = timed(lambda: run_ray(rayn))
        best[scale] = min(best[scale], secs)
        results[scale] = metrics(tp, split, tasks, chunks)
    rayn.close()

    ref = results["(ii) in-process evaluator"]
    same = {k: v == ref for k, v in results.items()}
    diff = {k: max(abs(v[t] - ref[t]) for t in tasks) for k, v in results.items()}
    print("\n| path | s per pass | sequences/s | GFLOP/s | x bound |\n|---|---|---|---|---|")
    print(f"| bound (FLOPs / torch.mm rate) | {bound_s:.2f} | {n_seq / bound_s:.0f} | {rate / 1e9:.1f} | 1.00 |")
    for k, s in best.items():
        print(f"| {k} | {s:.2f} | {n_seq / s:.0f} | {flops / s / 1e9:.1f} | {s / bound_s:.2f} |")
    t_i, t_ii = best.get("(i) plain loop"), best["(ii) in-process evaluator"]
    t_iii = best["(iii) Ray Data, 1 actor"]
    summary = {
        "ii_over_i_speedup": (t_i / t_ii) if t_i else None, "iii_over_ii": t_iii / t_ii, "ii_over_bound": t_ii / bound_s,
        "ray_overhead_s_median": float(np.median(overhead)), "ray_actor_start_s": t_ray1,
        "ray_scaleout_start_s": t_rayn, "scaleout_speedup_over_ii": t_ii / best[scale],
    }
    print(f"\n(ii)/(i): {summary['ii_over_i_speedup'] and round(summary['ii_over_i_speedup'], 2)}x faster; "
          f"(iii)/(ii): {summary['iii_over_ii']:.2f}x the time; (ii)/bound: {summary['ii_over_bound']:.2f}x; "
          f"(iii) per-call overhead {summary['ray_overhead_s_median']:.3f} s (median; actors started once in "
          f"{t_ray1:.1f} s); {args.actors} actors: {summary['scaleout_speedup_over_ii']:.2f}x (ii)")
    print("identical metrics to (ii): " + ", ".join(f"{k}: {same[k]} (max diff {diff[k]:.4f})" for k in results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"bench": str(path), "split": split, "device": args.device, "threads": args.threads, "batch_size": args.batch_size,
           "sequences": n_seq, "tokens": tokens, "gflop": flops / 1e9, "mm_gflops": rate / 1e9, "bound_s": bound_s,
           "seconds": best, "metrics": results, "identical_to_ii": same, **summary}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out / "results.json")
    ray.shutdown()


if __name__ == "__main__":
    main()
