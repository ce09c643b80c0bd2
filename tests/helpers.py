"""Tiny models made on the spot: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch


def perturbed(state: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' copy: float tensors get seeded noise; integer buffers are copied unchanged."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v.clone())
        for k, v in state.items()
    }


def tiny_state(seed: int = 0, layers: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"embed.weight": torch.randn(10, 6, generator=g)}
    for i in range(layers):
        sd[f"layers.{i}.w"] = torch.randn(6, 6, generator=g)
        sd[f"layers.{i}.b"] = torch.randn(6, generator=g)
    sd["position_ids"] = torch.arange(10)
    return sd


def make_gpt2_zoo(root: Path, n_models: int = 3, scale: float = 0.02, seed: int = 0) -> tuple[Path, list[Path]]:
    """A tiny GPT-2 base saved with save_pretrained plus ``n_models`` perturbed fine-tunes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    base = GPT2LMHeadModel(cfg)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    dirs = []
    for i in range(n_models):
        m = GPT2LMHeadModel(cfg)
        m.load_state_dict(perturbed(base.state_dict(), scale, seed + 1 + i))
        d = root / f"ft{i}"
        m.save_pretrained(d)
        dirs.append(d)
    return base_dir, dirs
