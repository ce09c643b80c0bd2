"""benchmarks/task_vector_cosines.py agrees with the Model Stock method's own ratio."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from searchmerge.methods.selection import model_stock

_spec = importlib.util.spec_from_file_location(
    "task_vector_cosines", Path(__file__).parents[1] / "benchmarks" / "task_vector_cosines.py"
)
tvc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tvc)  # type: ignore[union-attr]


def test_cosines_of_orthogonal_and_parallel_vectors():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    assert tvc.pairwise_cosines([e1, e2]) == [0.0]
    assert tvc.pairwise_cosines([e1, 2 * e1, -e1]) == [1.0, -1.0, -1.0]


def test_ratio_matches_model_stock():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(50, generator=g)
    taus = [shared + 0.7 * torch.randn(50, generator=g) for _ in range(3)]
    c = sum(tvc.pairwise_cosines(taus)) / 3
    t = tvc.model_stock_ratio(c, 3)
    merged = model_stock(torch.zeros(50), taus)  # θ₀ = 0: the merge is t·mean(τ)
    torch.testing.assert_close(merged, t * sum(taus) / 3, rtol=1e-5, atol=1e-6)
    assert 0.3 < c < 0.9 and 0.5 < t < 1.0
