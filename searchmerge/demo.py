"""The main job on the embedded default: merge a generated GPT-2 zoo with several recipes.

Writes each merged model as an HF folder, reloads one with ``from_pretrained`` and checks its logits
against the in-memory merge, and writes a summary table (CSV + markdown) — everything offline.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from searchmerge.recipe import Recipe

DEMO_RECIPES: dict[str, dict] = {
    "task_arithmetic": {"method": "task_arithmetic", "parameters": {"lambda": 0.3}},
    "ties_fusionbench": {"method": "ties", "parameters": {"density": 0.2, "lambda": 0.3, "merge_func": "sum",
                                                          "trim_scope": "model"}},
    "ties_mergekit": {"method": "ties", "parameters": {"density": 0.5, "weight": 0.5}},
    "dare_ties": {"method": "dare_ties", "parameters": {"density": 0.5, "lambda": 0.5}},
    "della": {"method": "della", "parameters": {"density": 0.5, "epsilon": 0.1}},
    "linear": {"method": "linear", "parameters": {}},
    "layer_gradient_ta": {"method": "task_arithmetic", "parameters": {"lambda": [0.1, 0.5, 1.0]}},
}


def run_demo(out: Path, *, quick: bool = False) -> list[dict]:
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM

    from searchmerge.io.writer import atomic_write_text
    from searchmerge.merge import merge
    from searchmerge.synthetic import make_synthetic_zoo

    from searchmerge.cli_errors import console_width

    console = Console(width=console_width())
    n_params = 1_000_000 if quick else 10_000_000
    console.print(f"[bold]searchmerge demo[/]: generated GPT-2 zoo (~{n_params/1e6:.0f}M params, 3 fine-tunes)")
    base, fts = make_synthetic_zoo(out / "zoo", n_params=n_params, n_models=3)
    rows = []
    for name, spec in DEMO_RECIPES.items():
        recipe = Recipe(
            method=spec["method"], base_model=None if spec["method"] == "linear" else str(base),
            models=[{"model": str(d)} for d in fts], parameters=spec["parameters"],
        )
        t0 = time.perf_counter()
        folder = merge(recipe, out=out / "merged" / name, overwrite=True, progress=not quick)
        seconds = time.perf_counter() - t0
        rows.append({"recipe": name, "method": recipe.method, "seconds": round(seconds, 3), "folder": str(folder)})
    # the written folder loads with transformers and matches the in-memory merge
    check = Recipe(method="ties", base_model=str(base), models=[{"model": str(d)} for d in fts],
                   parameters=DEMO_RECIPES["ties_fusionbench"]["parameters"])
    in_memory = merge(check)
    model = AutoModelForCausalLM.from_pretrained(out / "merged" / "ties_fusionbench")
    ref = AutoModelForCausalLM.from_pretrained(base)
    ref.load_state_dict(in_memory, strict=False)
    ids = torch.arange(16).unsqueeze(0)
    same = torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6)
    table = Table(title="demo merges")
    for col in ("recipe", "method", "seconds"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["recipe"], r["method"], f"{r['seconds']:.3f}")
    console.print(table)
    console.print(f"from_pretrained(merged folder) logits == in-memory merge: [bold]{same}[/]")
    lines = ["| recipe | method | seconds |", "|---|---|---|"] + [
        f"| {r['recipe']} | {r['method']} | {r['seconds']:.3f} |" for r in rows
    ]
    atomic_write_text(out / "demo.md", "\n".join(lines) + "\n")
    with open(out / "demo.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if not same:
        raise RuntimeError("merged folder does not reproduce the in-memory merge")
    return rows
