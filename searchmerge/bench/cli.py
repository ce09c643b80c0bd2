"""``searchmerge bench POOL_SPEC_OR_ZOO_NAME --out DIR``: run the leaderboard on a bench spec or a zoo."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ZOO_CHOICES = ("text", "vision", "fixture")


def resolve_spec(spec: str, cache_dir: str | None = None, progress: bool = True) -> Path:
    """A zoo name (built on first use, cached) or a bench spec YAML path."""
    if spec in ZOO_CHOICES:
        from searchmerge.bench.zoo import build_zoo

        return build_zoo(spec, cache_dir, progress=progress)
    return Path(spec)


def _cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from searchmerge.bench.leaderboard import default_entries, run_leaderboard

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    console = Console(stderr=True)
    path = resolve_spec(args.spec, args.cache_dir, progress=not args.quiet)
    console.print(f"bench spec: {path} ({time.perf_counter() - t0:.1f} s to resolve/build)")
    entries = default_entries(sweep=() if args.no_sweep else tuple(float(x) for x in args.sweep.split(",")))
    if args.methods:
        keep = set(args.methods.split(","))
        entries = [e for e in entries if e.label in keep or (e.method or e.label) in keep]
    eval_kwargs = {"backend": args.backend, "batch_size": args.batch_size}
    if args.backend == "ray":
        import os

        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind to 127.0.0.1 only
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=args.num_actors, include_dashboard=False, log_to_driver=False, configure_logging=False)
        eval_kwargs["num_actors"] = args.num_actors
    res = run_leaderboard(path, args.out, splits=tuple(args.splits.split(",")), entries=entries,
                          progress=not args.quiet, **eval_kwargs)
    console.print(Path(res["paths"]["md"]).read_text())
    console.print(f"wrote {', '.join(str(p) for p in res['paths'].values())}; wall {time.perf_counter() - t0:.1f} s")
    return 0


def add_bench_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``bench`` to the ``searchmerge`` CLI's subparsers."""
    p = subparsers.add_parser("bench", help="FusionBench-style leaderboard on a bench spec YAML or a zoo "
                                            f"({', '.join(ZOO_CHOICES)})")
    p.add_argument("spec", metavar="POOL_SPEC_OR_ZOO_NAME", help="bench spec YAML, or a zoo name: text, vision, fixture")
    p.add_argument("--out", type=Path, required=True, help="output folder (leaderboard.md/.csv/.parquet)")
    p.add_argument("--splits", default="validation,test", help="comma-separated splits (default validation,test)")
    p.add_argument("--methods", default="", help="comma-separated subset of rows/methods to run")
    p.add_argument("--sweep", default="0.1,0.5,0.7,1.0", help="extra task-arithmetic λ values")
    p.add_argument("--no-sweep", action="store_true", help="skip the task-arithmetic λ sweep")
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="evaluation path")
    p.add_argument("--num-actors", type=int, default=2, help="Ray Data actor pool size (--backend ray)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", default=None, help="zoo cache (default $SEARCHMERGE_CACHE or ~/.cache/searchmerge)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in this process (0: leave as is)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=_cmd_bench)
