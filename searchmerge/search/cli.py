"""``searchmerge search SPEC --out RUN_DIR`` and ``searchmerge report RUN_DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_search(args: argparse.Namespace) -> int:
    from searchmerge.search.run import search
    from searchmerge.search.spec import read_search_spec

    spec = read_search_spec(args.spec)
    update = {}
    if args.budget is not None:
        update["budget"] = spec.budget.model_copy(update={"trials": args.budget})
    if args.searcher is not None:
        update["searcher"] = args.searcher
    if args.concurrency is not None:
        update["concurrency"] = args.concurrency
    if update:
        from searchmerge.search.spec import parse_search_spec

        data = {**spec.model_dump(mode="json", exclude={"root"}), **{k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in update.items()}}
        spec = parse_search_spec(data, root=spec.root, where=f"{args.spec}: ")
    result = search(spec, args.out, resume=args.resume, force=args.force, progress=True)
    from searchmerge.search.report import render_report

    print(render_report(result.out), end="")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from searchmerge.search.report import render_report
    from searchmerge.search.spec import SearchSpecError

    if not (Path(args.run_dir) / "summary.json").is_file():
        raise SearchSpecError(f"{args.run_dir}: no summary.json (not a finished search run folder)")
    print(render_report(args.run_dir), end="")
    return 0


def add_search_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search merge recipes (Ray Tune + Optuna / Nevergrad) on a bench")
    p.add_argument("spec", type=Path)
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    p.add_argument("--budget", type=int, default=None, help="trials (overrides the spec)")
    p.add_argument("--searcher", default=None)
    p.add_argument("--concurrency", type=int, default=None)
    p.set_defaults(fn=_cmd_search)
    p = sub.add_parser("report", help="the table of a search run folder")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(fn=_cmd_report)
