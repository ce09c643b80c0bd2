"""Command line: ``searchmerge search | report | bench | merge | convert | methods | demo``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from searchmerge.cli_errors import OneLineParser, console_width, run_command

DESCRIPTION = """Search model-merging recipes fast: exact merge methods (ours and MergeKit's YAML), resident task
vectors on Ray, Tune/Optuna/Nevergrad search. The main job is `searchmerge search SPEC --out RUN_DIR`;
`searchmerge bench` runs the leaderboard, `searchmerge merge` one recipe."""

EPILOG = """exit codes: 0 done; 2 bad input (recipe, spec, checkpoint, output folder, command line); 1 runtime
failure (an unexpected error writes its traceback to a file; --debug prints it). See docs/errors.md."""


def _cmd_merge(args: argparse.Namespace) -> int:
    from searchmerge.merge import merge
    from searchmerge.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.seed is not None and recipe.data is not None:  # a data recipe's seed draws its examples / batches
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"seed": args.seed})})
    elif args.seed is not None:
        recipe = recipe.model_copy(update={"seed": args.seed})
    out = merge(
        recipe, out=args.out, device=args.device, out_dtype=args.dtype, allow_pickle=args.allow_pickle,
        overwrite=args.force, progress=not args.quiet, allow_non_finite=args.allow_non_finite, heads=args.heads,
    )
    from searchmerge.merge import plan_merge

    note = plan_merge(recipe, allow_pickle=args.allow_pickle).heads_message(args.heads) if recipe.data is None else None
    if note:
        print(note)
    print(f"wrote {out}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from searchmerge.mergekit import to_mergekit_yaml
    from searchmerge.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    text = to_mergekit_yaml(recipe) if args.to == "mergekit" else recipe.to_yaml()
    if args.out:
        from searchmerge.io.writer import atomic_write_text

        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from searchmerge.methods.registry import list_methods

    table = Table(title="searchmerge merge methods (per model: set under models[i].parameters, or globally)")
    for col in ("method", "aliases", "inputs", "base", "models", "parameters (default, valid range)", "reference"):
        table.add_column(col, overflow="fold")
    for spec in list_methods():
        params = []
        for p in spec.params:
            desc = f"{p.name}={p.default!r}{' (per model)' if p.per_model else ''}"
            if p.choices:
                desc += f" ∈ {list(p.choices)}"
            elif p.range is not None:
                desc += f" ∈ {p.range.describe()}"
            params.append(desc)
        models = f"{spec.min_models}+" if spec.max_models is None else f"{spec.min_models}-{spec.max_models}"
        table.add_row(spec.name, ", ".join(spec.aliases) or "-", spec.inputs, spec.base, models,
                      "\n".join(params) or "-", spec.reference)
    Console(width=args.width or console_width()).print(table)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from searchmerge.demo import run_demo

    from searchmerge.io.outdir import fresh_dir

    with fresh_dir(args.out, force=args.force) as out:
        run_demo(out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from searchmerge import __version__

    parser = OneLineParser(prog="searchmerge", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"searchmerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("merge", help="merge checkpoints per a recipe (ours or MergeKit YAML; data-driven merges "
                                     "name their bench under `data:`)")
    p.add_argument("recipe", type=Path)
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "float64"],
                   help="output dtype (default: the recipe's out_dtype, else the base's)")
    p.add_argument("--seed", type=int, default=None,
                   help="override the recipe's seed (random methods; a data recipe's `data.seed`)")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin/.pt checkpoints (weights_only=True)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder (once the new one is complete)")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="merge checkpoints holding NaN/±Inf (and write non-finite output) instead of refusing")
    p.add_argument("--heads", choices=["drop", "per_task"], default="drop",
                   help="task-model folders (…ForSequenceClassification, …ForImageClassification, ...): leave their heads out (the output is the "
                        "merged base model), or also write tasks/<model>/, each model's head on the merged backbone")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=_cmd_merge)

    p = sub.add_parser("convert", help="convert a recipe to MergeKit YAML (or normalise our YAML)")
    p.add_argument("recipe", type=Path)
    p.add_argument("--to", choices=["mergekit", "searchmerge"], default="mergekit")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(fn=_cmd_convert)

    p = sub.add_parser("methods", help="list merge methods with their parameters and ranges")
    p.add_argument("--width", type=int, default=None, help="table width (default: the terminal's; 240 when piped)")
    p.set_defaults(fn=_cmd_methods)

    p = sub.add_parser("demo", help="a quick offline demo: merge a generated GPT-2 zoo with several recipes")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quick", action="store_true", help="a seconds-fast version (tests)")
    p.set_defaults(fn=_cmd_demo)

    for module in ("searchmerge.bench.cli", "searchmerge.search.cli"):
        try:
            found = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            found = None
        if found is None:
            continue
        mod = importlib.import_module(module)
        for name in dir(mod):
            if name.startswith("add_") and name.endswith("_commands"):
                getattr(mod, name)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run one command; every failure is one stderr line and an exit code (docs/errors.md)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (already printed on one line)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    return run_command(args.fn, args, debug=debug)


if __name__ == "__main__":
    raise SystemExit(main())
