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
    from searchmerge.cluster.connect import is_job_server, resolve_address

    address = resolve_address(args.address)
    if is_job_server(address):
        return _submit(args, address)
    result = search(spec, args.out, resume=args.resume, force=args.force, progress=True, address=address)
    from searchmerge.search.report import render_report

    print(render_report(result.out), end="")
    return 0


def _submit(args: argparse.Namespace, address: str) -> int:
    """The search as a Ray job on the cluster behind ``address`` (validated here first, run there)."""
    from searchmerge.cluster.jobs import (
        JobFailed, job_runtime_env, parse_runtime_env_json, search_entrypoint, submit_search,
    )

    flags = [f for f, on in (("--resume", args.resume), ("--force", args.force)) if on]
    for name in ("budget", "searcher", "concurrency"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    wd = args.working_dir.resolve()
    env = job_runtime_env(wd, parse_runtime_env_json(args.runtime_env_json))
    job_id, status = submit_search(address, search_entrypoint(args.spec, str(args.out), wd, flags), env,
                                   wait=not args.no_wait)
    if status not in ("SUCCEEDED", "PENDING"):
        raise JobFailed(f"job {job_id} ended {status} — `ray job logs {job_id} --address {address}` shows why")
    print(f"job {job_id}: {status}" + ("" if args.no_wait else f"; the run folder is {args.out}"))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from searchmerge.search.report import render_report
    from searchmerge.search.spec import SearchSpecError

    run_dir = args.run_dir
    from searchmerge.io import remote

    if remote.is_uri(run_dir):  # a remote run folder: its files (not Tune's state) pulled into a local copy
        uri = remote.check_uri(run_dir, flag="report")
        run_dir = remote.staging_dir(uri, "report")
        remote.pull(uri, run_dir, skip=["tune"])
    if not (Path(run_dir) / "summary.json").is_file():
        raise SearchSpecError(f"{args.run_dir}: no summary.json (not a finished search run folder)")
    print(render_report(run_dir), end="")
    return 0


def add_search_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search merge recipes (Ray Tune + Optuna / Nevergrad) on a bench")
    p.add_argument("spec", type=Path)
    p.add_argument("--out", required=True, help="run folder: a path, or s3:// / gs:// / file:// (staged here, mirrored)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    p.add_argument("--budget", type=int, default=None, help="trials (overrides the spec)")
    p.add_argument("--searcher", default=None)
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--address", default=None,
                   help="Ray cluster: auto | ray://HOST:10001 | HOST:6379 (drive from here) | http://HOST:8265 "
                        "(submit as a Ray job); default RAY_ADDRESS, else a local Ray on 127.0.0.1")
    p.add_argument("--runtime-env-json", default=None, help="with an http:// address: added to the job's runtime env")
    p.add_argument("--working-dir", type=Path, default=Path("."), help="with an http:// address: the folder uploaded")
    p.add_argument("--no-wait", action="store_true", help="with an http:// address: submit and return")
    p.set_defaults(fn=_cmd_search)
    p = sub.add_parser("report", help="the table of a search run folder")
    p.add_argument("run_dir", help="a run folder, or its s3:// / gs:// / file:// URI")
    p.set_defaults(fn=_cmd_report)
