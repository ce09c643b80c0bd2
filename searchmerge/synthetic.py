"""Generated model zoos for benchmarks and the quick demo: a real ``transformers`` base saved with
``save_pretrained`` plus N 'fine-tuned' copies with seeded, low-rank-plus-noise task vectors.

Task vectors are structured (a shared low-rank direction per model plus small noise), so merges differ
between methods the way they do on real fine-tunes; nothing is trained, so a 100M-parameter zoo builds
in seconds. Building is cached: a zoo is rebuilt only when its definition changes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from searchmerge.io.writer import write_safetensors_folder

ZOO_VERSION = 1


def gpt2_config(n_params: int):
    """A GPT-2 config of about ``n_params`` parameters (≈12·L·d² + vocab·d)."""
    from transformers import GPT2Config

    presets = [
        (1_000_000, dict(n_layer=2, n_embd=128, n_head=2, vocab_size=1024)),
        (10_000_000, dict(n_layer=4, n_embd=384, n_head=6, vocab_size=4096)),
        (50_000_000, dict(n_layer=8, n_embd=640, n_head=8, vocab_size=8192)),
        (100_000_000, dict(n_layer=12, n_embd=768, n_head=12, vocab_size=16384)),
    ]
    for limit, kw in presets:
        if n_params <= limit:
            return GPT2Config(n_positions=128, bos_token_id=0, eos_token_id=0, **kw)
    return GPT2Config(n_positions=128, bos_token_id=0, eos_token_id=0, **presets[-1][1])


def _task_vector(param: torch.Tensor, gen: torch.Generator, scale: float) -> torch.Tensor:
    if param.dim() == 2:
        rank = 4
        u = torch.randn(param.shape[0], rank, generator=gen) / rank**0.5
        v = torch.randn(rank, param.shape[1], generator=gen)
        low_rank = u @ v
    else:
        low_rank = torch.randn(param.shape, generator=gen)
    noise = torch.randn(param.shape, generator=gen)
    return scale * (low_rank + 0.5 * noise) * param.float().std().clamp(min=1e-3)


def make_synthetic_zoo(
    root: str | Path, *, n_params: int = 100_000_000, n_models: int = 4, seed: int = 0, scale: float = 0.05
) -> tuple[Path, list[Path]]:
    """Build (or reuse) ``root/base`` and ``root/ft{i}``; returns (base folder, fine-tuned folders)."""
    from transformers import GPT2LMHeadModel

    root = Path(root)
    spec = {"version": ZOO_VERSION, "n_params": n_params, "n_models": n_models, "seed": seed, "scale": scale}
    marker = root / "zoo.json"
    base_dir = root / "base"
    ft_dirs = [root / f"ft{i}" for i in range(n_models)]
    if marker.is_file() and json.loads(marker.read_text()) == spec and all(d.is_dir() for d in [base_dir, *ft_dirs]):
        return base_dir, ft_dirs
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config(n_params))
    model.save_pretrained(base_dir)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    from searchmerge.io.checkpoint import CheckpointReader

    stored = CheckpointReader(base_dir).keys()  # save_pretrained drops tied weights (lm_head)
    for i, d in enumerate(ft_dirs):
        gen = torch.Generator().manual_seed(seed * 1000 + i + 1)
        ft = {
            k: (state[k] + _task_vector(state[k], gen, scale) if state[k].is_floating_point() else state[k].clone())
            for k in stored
        }
        write_safetensors_folder(ft, d, config_from=base_dir)
    marker.write_text(json.dumps(spec))
    return base_dir, ft_dirs
