"""Merge the same MergeKit configs with MergeKit and with searchmerge, and print the max |Δ| per method.

MergeKit is not a dependency; install it in its own venv (it needs the same CPU torch pin) and pass its
``mergekit-yaml`` executable:

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install -c constraints.txt torch==2.13.0 mergekit==0.1.5
    .venv/bin/python benchmarks/compare_mergekit.py --mergekit-yaml /tmp/mk/bin/mergekit-yaml

Random methods (DARE, DELLA) draw their masks from different RNG streams in the two tools (MergeKit:
one global stream in schedule order; searchmerge: one generator per tensor), so they are compared at
density 1 (exact) and by kept fraction at density < 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import yaml

from searchmerge.io.checkpoint import CheckpointReader
from searchmerge.merge import merge
from searchmerge.recipe import load_recipe


def make_llama_zoo(root: Path, n_models: int = 3) -> tuple[Path, list[Path]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    dirs = []
    for i in range(n_models):
        g = torch.Generator().manual_seed(i + 1)
        m = LlamaForCausalLM(cfg)
        m.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
        m.save_pretrained(root / f"ft{i}")
        dirs.append(root / f"ft{i}")
    return root / "base", dirs


def configs(base: Path, fts: list[Path]) -> dict[str, dict]:
    b, m = str(base), [str(f) for f in fts]
    grad = [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]
    gta = lambda method, **p: {  # noqa: E731
        "merge_method": method, "base_model": b, "dtype": "float32",
        "models": [{"model": m[0], "parameters": {"weight": 1.0, "density": [1, 0.7, 0.3]}},
                   {"model": m[1], "parameters": {"weight": [0, 0.5, 1], "density": 0.5}},
                   {"model": m[2], "parameters": {"weight": grad, "density": 0.4}}],
        "parameters": p,
    }
    gammas = [0.02, [0.0, 0.1], [{"filter": "mlp", "value": 0.05}, {"value": 0.01}]]
    epsilons = [0.1, [0.05, 0.2], [{"filter": "self_attn", "value": 0.15}, {"value": 0.05}]]

    def per_model(cfg: dict, name: str, values: list) -> dict:
        models = [{**e, "parameters": {**e["parameters"], name: v}} for e, v in zip(cfg["models"], values)]
        return {**cfg, "models": models}

    return {
        "linear": {"merge_method": "linear", "dtype": "float32",
                   "models": [{"model": x, "parameters": {"weight": w}} for x, w in zip(m, (1.0, 0.5, [0, 1]))]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b, "dtype": "float32",
                            "models": [{"model": x, "parameters": {"weight": 0.3}} for x in m],
                            "parameters": {"lambda": 0.8}},
        "ties": gta("ties", normalize=True),
        "ties_sum": gta("ties", normalize=False, **{"lambda": 0.5}),
        "breadcrumbs": gta("breadcrumbs", gamma=0.05),
        "breadcrumbs_ties": gta("breadcrumbs_ties", gamma=0.05),
        # MergeKit 0.1.5 declares gamma / epsilon per model (ParameterScope.NON_BASE): per model, per tensor
        # (filters) and per depth (gradients), next to the per-model densities of `gta`
        "breadcrumbs_per_model_gamma": per_model(gta("breadcrumbs"), "gamma", gammas),
        "breadcrumbs_ties_per_model_gamma": per_model(gta("breadcrumbs_ties", normalize=True), "gamma", gammas),
        "ties_rescale": gta("ties", rescale=True),
        "breadcrumbs_rescale": per_model(gta("breadcrumbs", rescale=True), "gamma", gammas),
        # random masks: different RNG streams, so only the kept fraction agrees (see the module docstring)
        "della_per_model_epsilon": per_model(gta("della"), "epsilon", epsilons),
        "della_linear_per_model_epsilon": per_model(gta("della_linear", **{"lambda": 0.9}), "epsilon", epsilons),
        "dare_ties_density1": {**gta("dare_ties"), "models": [{"model": x, "parameters": {"weight": 0.5}} for x in m]},
        "dare_linear_density1": {**gta("dare_linear"), "models": [{"model": x, "parameters": {"weight": 0.5}} for x in m]},
        "sce": {"merge_method": "sce", "base_model": b, "dtype": "float32", "models": [{"model": x} for x in m],
                "parameters": {"select_topk": 0.5}},
        "slerp": {"merge_method": "slerp", "base_model": b, "dtype": "float32",
                  "models": [{"model": b}, {"model": m[0]}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}},
        "nuslerp": {"merge_method": "nuslerp", "base_model": b, "dtype": "float32",
                    "models": [{"model": m[0], "parameters": {"weight": 0.3}}, {"model": m[1], "parameters": {"weight": 0.7}}]},
        "karcher": {"merge_method": "karcher", "dtype": "float32", "models": [{"model": x} for x in m]},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "dtype": "float32",
                        "models": [{"model": x} for x in m]},
    }


def max_abs_diff(a: Path, b: Path) -> float:
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    if set(ra.keys()) != set(rb.keys()):
        return float("inf")
    return max((ra.get(k).double() - rb.get(k).double()).abs().max().item() for k in ra.keys())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mergekit-yaml", required=True)
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, fts = make_llama_zoo(root)
        print("| config | max abs diff vs MergeKit |\n|---|---|")
        for name, cfg in configs(base, fts).items():
            f = root / f"{name}.yaml"
            f.write_text(yaml.safe_dump(cfg))
            mk = root / f"mk_{name}"
            proc = subprocess.run([args.mergekit_yaml, str(f), str(mk), "--random-seed", "0"], env=env,
                                  capture_output=True, text=True)
            if not (mk / "model.safetensors").is_file():
                print(f"| {name} | MergeKit failed: {proc.stderr.strip().splitlines()[-1][:80]} |")
                continue
            try:
                ours = merge(load_recipe(f), out=root / f"sm_{name}")
            except Exception as exc:  # report, keep going
                print(f"| {name} | searchmerge failed: {exc} |")
                continue
            print(f"| {name} | {max_abs_diff(mk, ours):.3g} |")


if __name__ == "__main__":
    main()
