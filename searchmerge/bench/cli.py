"""``searchmerge bench POOL_SPEC_OR_ZOO_NAME --out DIR``: run the leaderboard on a bench spec or a zoo."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

ZOO_CHOICES = ("text", "vision", "fixture")


def resolve_spec(spec: str, cache_dir: str | None = None, progress: bool = True) -> Path:
    """A zoo name (built on first use, cached) or a bench spec YAML path."""
    if spec in ZOO_CHOICES:
        from searchmerge.bench.zoo import build_zoo

        return build_zoo(spec, cache_dir, progress=progress)
    check_spec_arg(spec)
    return Path(spec)


def check_spec_arg(spec: str) -> None:
    """Refuse a POOL_SPEC_OR_ZOO_NAME that is neither a zoo name nor an existing file (suggesting the zoo)."""
    from searchmerge.errors import UsageError
    from searchmerge.suggest import did_you_mean

    if spec in ZOO_CHOICES or Path(spec).is_file():
        return
    hint = did_you_mean(spec, ZOO_CHOICES)
    raise UsageError(f"{spec}: neither a zoo name nor a bench spec file — "
                     f"{hint + ' ' if hint else ''}zoos: {', '.join(ZOO_CHOICES)}")


def select_entries(entries: list[Any], wanted: str) -> list[Any]:
    """The rows named in ``--methods`` (labels, method names or aliases), in leaderboard order; typos refused."""
    from searchmerge.errors import UsageError
    from searchmerge.methods.registry import get_method
    from searchmerge.suggest import unknown

    names = [w.strip() for w in wanted.split(",") if w.strip()]
    if not names:
        raise UsageError("--methods is empty — name one or more leaderboard rows, e.g. --methods ties,task_arithmetic")
    options = sorted({e.label for e in entries} | {e.method for e in entries if e.method})
    keep = set()
    for name in names:
        if name not in options:
            try:
                name = get_method(name).name  # an alias, e.g. weighted_average -> linear
            except Exception:  # noqa: BLE001 - reported below with a suggestion
                pass
        if name not in options:
            what, fix = unknown("leaderboard row or method", name, options)
            raise UsageError(f"--methods: {what} — {fix}")
        keep.add(name)
    return [e for e in entries if e.label in keep or (e.method or e.label) in keep]


def _floats(text: str, flag: str) -> tuple[float, ...]:
    from searchmerge.errors import UsageError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.1,0.5,1.0") from None


def _splits(text: str) -> tuple[str, ...]:
    from searchmerge.bench.pool import SPLITS
    from searchmerge.errors import UsageError
    from searchmerge.suggest import unknown

    splits = tuple(s.strip() for s in text.split(",") if s.strip())
    for s in splits:
        if s not in SPLITS:
            what, fix = unknown("split", s, SPLITS)
            raise UsageError(f"--splits: {what} — {fix}")
    if not splits:
        raise UsageError(f"--splits is empty — name one or more of {', '.join(SPLITS)}")
    return splits


def _cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from searchmerge.bench.leaderboard import default_entries, run_leaderboard
    from searchmerge.cli_errors import console_width
    from searchmerge.io.outdir import check_output_dir, staged_dir

    import torch

    # every argument and the output folder are checked before any work (a zoo build takes minutes)
    check_spec_arg(args.spec)
    splits = _splits(args.splits)
    entries = default_entries(sweep=() if args.no_sweep else _floats(args.sweep, "--sweep"), fusion=not args.no_fusion)
    if args.methods:
        entries = select_entries(entries, args.methods)
    check_output_dir(args.out, force=args.force)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    console = Console(stderr=True, width=console_width())
    path = resolve_spec(args.spec, args.cache_dir, progress=not args.quiet)
    console.print(f"bench spec: {path} ({time.perf_counter() - t0:.1f} s to resolve/build)")
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
    with staged_dir(args.out, force=args.force) as tmp:  # the old folder stays until the new one is complete
        res = run_leaderboard(path, tmp, splits=splits, entries=entries, progress=not args.quiet, **eval_kwargs)
        md = Path(res["paths"]["md"]).read_text()
    written = [str(Path(args.out) / Path(p).name) for p in res["paths"].values()]
    console.print(md)
    console.print(f"wrote {', '.join(written)}; wall {time.perf_counter() - t0:.1f} s")
    return 0


def add_bench_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``bench`` to the ``searchmerge`` CLI's subparsers."""
    p = subparsers.add_parser("bench", help="FusionBench-style leaderboard on a bench spec YAML or a zoo "
                                            f"({', '.join(ZOO_CHOICES)})")
    p.add_argument("spec", metavar="POOL_SPEC_OR_ZOO_NAME", help="bench spec YAML, or a zoo name: text, vision, fixture")
    p.add_argument("--out", type=Path, required=True, help="output folder (leaderboard.md/.csv/.parquet)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder (once the new one is complete)")
    p.add_argument("--splits", default="validation,test", help="comma-separated splits (default validation,test)")
    p.add_argument("--methods", default="", help="comma-separated subset of rows/methods to run")
    p.add_argument("--sweep", default="0.1,0.5,0.7,1.0", help="extra task-arithmetic λ values")
    p.add_argument("--no-sweep", action="store_true", help="skip the task-arithmetic λ sweep")
    p.add_argument("--no-fusion", action="store_true",
                   help="skip the data-driven rows (fisher, regmean, adamerging_*, ensemble_*; docs/fusion.md)")
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="evaluation path")
    p.add_argument("--num-actors", type=int, default=2, help="Ray Data actor pool size (--backend ray)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", default=None, help="zoo cache (default $SEARCHMERGE_CACHE or ~/.cache/searchmerge)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in this process (0: leave as is)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=_cmd_bench)
