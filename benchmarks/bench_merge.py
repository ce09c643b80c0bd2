"""Time and peak memory per merge method: searchmerge's lazy per-tensor merge vs a naive state-dict loop.

Both run on the same generated GPT-2 zoo (default ~100M parameters, 4 fine-tuned models) and both write
the merged model to disk. The naive baseline is what a hand-written script does: load every checkpoint
whole (``safetensors.torch.load_file``), loop over keys applying the same per-tensor maths, save. Each run
happens in a fresh child process; peak memory is its sampled anonymous RSS (file pages that safetensors
memory-maps are reclaimable and not counted); the table prints ratios baseline/ours.

    .venv/bin/python benchmarks/bench_merge.py                 # ~100M params, 4 models
    .venv/bin/python benchmarks/bench_merge.py --params 10e6   # quick
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path

RECIPES: dict[str, dict] = {
    "task_arithmetic": {"method": "task_arithmetic", "parameters": {"lambda": 0.3}},
    "ties (per tensor)": {"method": "ties", "parameters": {"density": 0.2, "lambda": 0.3, "merge_func": "sum"}},
    "ties (whole model)": {"method": "ties", "parameters": {"density": 0.2, "lambda": 0.3, "merge_func": "sum",
                                                            "trim_scope": "model"}},
    "dare_ties": {"method": "dare_ties", "parameters": {"density": 0.5, "lambda": 0.5}},
    "breadcrumbs": {"method": "breadcrumbs", "parameters": {"density": 0.5, "gamma": 0.01}},
    "della": {"method": "della", "parameters": {"density": 0.5, "epsilon": 0.1}},
    "sce": {"method": "sce", "parameters": {"select_topk": 0.5}},
    "linear": {"method": "linear", "parameters": {}},
    "karcher": {"method": "karcher", "parameters": {}},
    "magmax": {"method": "magmax", "parameters": {}},
    "model_stock": {"method": "model_stock", "parameters": {}},
    "iso_c": {"method": "iso_c", "parameters": {}},
    "iso_cts": {"method": "iso_cts", "parameters": {}},
    "tsv_m": {"method": "tsv_m", "parameters": {}},
}


def _recipe(name: str, base: str, fts: list[str]):
    from searchmerge.methods.registry import get_method
    from searchmerge.recipe import Recipe

    spec = RECIPES[name]
    needs_base = get_method(spec["method"]).base == "required"
    return Recipe(method=spec["method"], base_model=base if needs_base else None,
                  models=[{"model": f} for f in fts], parameters=spec["parameters"])


def _ours(name: str, base: str, fts: list[str], out: str) -> None:
    from searchmerge.merge import merge

    merge(_recipe(name, base, fts), out=out)


def _load_whole(folder: str) -> dict:
    """What FusionBench's model pool does: instantiate the model, take its state dict."""
    from transformers import AutoModelForCausalLM

    return {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def _naive(name: str, base: str, fts: list[str], out: str) -> None:
    """Load every model whole, then loop over keys with the same per-tensor maths, then save."""
    from safetensors.torch import save_file

    from searchmerge.merge import _whole_model_stats, merge_tensor, plan_merge, tensor_rng

    recipe = _recipe(name, base, fts)
    base_sd = _load_whole(base)
    models = [_load_whole(f) for f in fts]
    plan = plan_merge(recipe, base=base_sd, models=models)
    stats = _whole_model_stats(plan, "cpu", __import__("torch").float32)
    out_sd = {}
    for k in plan.keys:
        if k not in models[0]:
            continue
        if not base_sd[k].is_floating_point():
            out_sd[k] = base_sd[k]
            continue
        out_sd[k] = merge_tensor(
            plan.spec, base_sd[k] if plan.base is not None else None, [m[k] for m in models], plan.params_for(k),
            rng=tensor_rng(recipe.seed, k), stats=stats,
        ).to(base_sd[k].dtype).contiguous()
    Path(out).mkdir(parents=True)
    save_file({k: v for k, v in out_sd.items() if k != "lm_head.weight"}, f"{out}/model.safetensors")


def _peak_anon_gib(stop, box: list) -> None:  # noqa: ANN001
    """Sample RssAnon (anonymous memory: what the process really holds, not mmapped file pages)."""
    peak = 0
    while not stop.is_set():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak = max(peak, int(line.split()[1]))
        stop.wait(0.01)
    box.append(peak / 1024**2)


def _child(kind: str, name: str, base: str, fts: list[str], out: str, queue) -> None:  # noqa: ANN001
    import threading

    import torch

    torch.set_num_threads(2)
    import transformers  # noqa: F401  (import cost outside the timing)

    stop, box = threading.Event(), []
    sampler = threading.Thread(target=_peak_anon_gib, args=(stop, box))
    sampler.start()
    t0 = time.perf_counter()
    (_ours if kind == "ours" else _naive)(name, base, fts, out)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    queue.put((seconds, box[0]))


def measure(kind: str, name: str, base: str, fts: list[str], tmp: Path) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    out = tmp / f"{kind}-{name.replace(' ', '_')}"
    proc = ctx.Process(target=_child, args=(kind, name, base, fts, str(out), queue))
    proc.start()
    result = queue.get()
    proc.join()
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    from searchmerge.synthetic import make_synthetic_zoo

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--methods", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--zoo", type=Path, default=Path(tempfile.gettempdir()) / "searchmerge-bench-zoo")
    args = ap.parse_args()
    base, fts = make_synthetic_zoo(args.zoo, n_params=int(args.params), n_models=args.models)
    from searchmerge.io.checkpoint import CheckpointReader

    reader = CheckpointReader(base)
    n = sum(__import__("math").prod(reader.shape(k)) for k in reader.keys())
    print(f"zoo: {n/1e6:.1f}M parameters per model, {args.models} fine-tuned + base, fp32\n")
    print("| method | naive s | ours s | time ratio (naive/ours) | naive peak anon GiB | ours peak anon GiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            t_n, m_n = measure("naive", name, str(base), [str(f) for f in fts], Path(tmp))
            t_o, m_o = measure("ours", name, str(base), [str(f) for f in fts], Path(tmp))
            print(f"| {name} | {t_n:.1f} | {t_o:.1f} | {t_n / t_o:.2f} | {m_n:.2f} | {m_o:.2f} | {m_n / m_o:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
