"""MagMax, Model Stock, ISO-C, ISO-CTS and TSV-M: hand-computed cases, numpy re-implementations, invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from searchmerge.merge import merge, merge_tensor
from searchmerge.methods import get_method
from searchmerge.methods.subspace import iso_cts_split
from searchmerge.recipe import ModelEntry, Recipe
from tests.helpers import perturbed, tiny_state

T = torch.tensor


def run(method: str, deltas: list[torch.Tensor], base: torch.Tensor | None = None, **params) -> torch.Tensor:
    """The merged task vector of ``method`` with defaults filled in (per-model params as lists)."""
    spec = get_method(method)
    params = {k.rstrip("_"): v for k, v in params.items()}  # lambda_ → lambda
    assert set(params) <= {p.name for p in spec.params}, params
    full = {}
    for p in spec.params:
        value = params.get(p.name, p.default)
        full[p.name] = [value] * len(deltas) if p.per_model and not isinstance(value, list) else value
    b = torch.zeros_like(deltas[0]) if base is None else base
    return spec(b, deltas, full)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- numpy re-implementations of the reference formulas (float64) ----------------------------------


def np_polar(a: np.ndarray) -> np.ndarray:
    u, _, vh = np.linalg.svd(a, full_matrices=False)
    return u @ vh


def np_iso_c(taus: list[np.ndarray]) -> np.ndarray:
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ vh


def np_iso_cts(taus: list[np.ndarray], frac: float) -> np.ndarray:
    n, r = len(taus), min(taus[0].shape)
    c = int(r * frac)
    c = r - round((r - c) / n) * n
    p = (r - c) // n
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    uc, sc, vc = u[:, :c], s[:c], vh[:c]
    us, ss, vs = [], [], []
    for t in taus:
        ut, st, vt = np.linalg.svd(t - uc @ uc.T @ t, full_matrices=False)
        us.append(ut[:, :p]), ss.append(st[:p]), vs.append(vt[:p])
    U, S, V = np.hstack(us + [uc]), np.concatenate(ss + [sc]), np.vstack(vs + [vc])
    return np_polar(U) @ np.diag(np.full_like(S, S.mean())) @ np_polar(V)


def np_tsv_m(taus: list[np.ndarray]) -> np.ndarray:
    n, (rows, cols) = len(taus), taus[0].shape
    r = min(rows, cols)
    k = int(r * (1 / n))
    U, S, V = np.zeros((rows, r)), np.zeros(r), np.zeros((r, cols))
    for i, t in enumerate(taus):
        u, s, vh = np.linalg.svd(t, full_matrices=False)
        U[:, i * k:(i + 1) * k], S[i * k:(i + 1) * k], V[i * k:(i + 1) * k] = u[:, :k], s[:k], vh[:k]
    return np_polar(U) @ np.diag(S) @ np_polar(V)


def np_model_stock(taus: list[np.ndarray]) -> np.ndarray:
    flat = [t.ravel() for t in taus]
    cos = [
        np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
        for i, a in enumerate(flat) for b in flat[i + 1:]
    ]
    c, n = float(np.mean(cos)), len(taus)
    return n * c / (1 + (n - 1) * c) * np.mean(taus, axis=0)


# --- MagMax ----------------------------------------------------------------------------------------


def test_magmax_hand_case_and_later_model_wins_ties():
    d1, d2 = T([1.0, -3.0, 2.0, 0.0, -5.0]), T([-2.0, 3.0, 1.0, 0.0, 4.0])
    out = run("magmax", [d1, d2])  # default λ = 0.5
    assert torch.equal(out, T([-1.0, 1.5, 1.0, 0.0, -2.5]))
    assert torch.equal(run("magmax", [T([3.0]), T([-3.0])], lambda_=1.0), T([-3.0]))
    assert torch.equal(run("magmax", [T([-3.0]), T([3.0])], lambda_=1.0), T([3.0]))


def test_magmax_three_models_and_identities():
    ds = [rand(4, 3, seed=i) for i in range(3)]
    stacked = torch.stack(ds)
    idx = stacked.abs().argmax(dim=0, keepdim=True)
    torch.testing.assert_close(run("magmax", ds, lambda_=1.0), stacked.gather(0, idx).squeeze(0))
    assert torch.equal(run("magmax", ds[:1], lambda_=1.0), ds[0])
    assert torch.equal(run("magmax", ds, lambda_=0.0), torch.zeros(4, 3, dtype=torch.float64))


# --- Model Stock -----------------------------------------------------------------------------------


def test_model_stock_hand_cases():
    base = T([10.0, 20.0])
    # cos(τ1, τ2) = 1/√2 → t = 2c/(1+c) = 2(√2 − 1); mean τ = [1, 0.5]
    out = merge_tensor(get_method("model_stock"), base, [base + T([1.0, 0.0]), base + T([1.0, 1.0])],
                       {"filter_wise": False})
    t = 2 * (math.sqrt(2) - 1)
    torch.testing.assert_close(out, T([10.0 + t, 20.0 + 0.5 * t]))
    # orthogonal task vectors → t = 0 → the base; a zero task vector → c = 0 → the base
    assert torch.equal(run("model_stock", [T([1.0, 0.0]), T([0.0, 2.0])]), T([0.0, 0.0]))
    assert torch.equal(run("model_stock", [T([1.0, 3.0]), T([0.0, 0.0])]), T([0.0, 0.0]))


def test_model_stock_identical_task_vectors_give_that_model():
    d = rand(3, 4, seed=1)
    for n in (2, 3, 5):
        torch.testing.assert_close(run("model_stock", [d] * n), d)  # c = 1 → t = 1 → mean(θ_i)


def test_model_stock_matches_reference_formula_for_three_models():
    ds = [rand(5, 4, seed=i) + 0.5 for i in range(3)]
    expected = np_model_stock([d.numpy() for d in ds])
    torch.testing.assert_close(run("model_stock", ds), torch.from_numpy(expected))


def test_model_stock_filter_wise_is_per_row():
    d1 = T([[1.0, 0.0], [1.0, 0.0]])
    d2 = T([[0.0, 1.0], [1.0, 0.0]])
    # row 0: c = 0 → t = 0; row 1: c = 1 → t = 1 → mean row
    assert torch.equal(run("model_stock", [d1, d2], filter_wise=True), T([[0.0, 0.0], [1.0, 0.0]]))
    flat = run("model_stock", [d1, d2])  # c = 1/2 → t = 2/3
    torch.testing.assert_close(flat, (2 / 3) * (d1 + d2) / 2)
    v1, v2 = rand(6, seed=3), rand(6, seed=4)  # a 1-D tensor is one row: same as flattened
    torch.testing.assert_close(run("model_stock", [v1, v2], filter_wise=True), run("model_stock", [v1, v2]))


# --- ISO-C ------------------------------------------------------------------------------------------


def test_iso_c_hand_case():
    d1, d2 = T([[3.0, 0.0], [0.0, 0.0]]), T([[0.0, 0.0], [0.0, 1.0]])
    # Σ τ = diag(3, 1): S → mean 2 → 2·I
    torch.testing.assert_close(run("iso_c", [d1, d2]), 2 * torch.eye(2))
    torch.testing.assert_close(run("iso_c", [d1, d2], lambda_=0.5), torch.eye(2))
    # non-matrix tensors (and `svd: false`) get the plain mean × λ
    torch.testing.assert_close(run("iso_c", [T([1.0, 2.0]), T([3.0, 4.0])], lambda_=2.0), T([4.0, 6.0]))
    torch.testing.assert_close(run("iso_c", [d1, d2], svd=False), (d1 + d2) / 2)


def test_iso_c_rank_one():
    row = T([[1.0, -2.0, 2.0]])  # one singular value: isotropic = itself
    torch.testing.assert_close(run("iso_c", [row]), row)
    torch.testing.assert_close(run("iso_c", [row, 2 * row]), 3 * row)
    # square rank-1 σ·u vᵀ: the σ direction keeps σ/r, the norm is σ/√r (null-space directions: SVD's choice)
    u, v = T([0.6, 0.8, 0.0]), T([0.0, 1.0, 0.0])
    out = run("iso_c", [5.0 * torch.outer(u, v)])
    torch.testing.assert_close(u @ out @ v, torch.tensor(5.0 / 3))
    torch.testing.assert_close(torch.linalg.matrix_norm(out), torch.tensor(5.0 / math.sqrt(3)))


def test_iso_c_matches_reference_formula():
    ds = [rand(5, 3, seed=i) for i in range(3)]
    torch.testing.assert_close(run("iso_c", ds), torch.from_numpy(np_iso_c([d.numpy() for d in ds])))


# --- ISO-CTS ----------------------------------------------------------------------------------------


def test_iso_cts_split_hand_cases():
    assert iso_cts_split(6, 3, 0.8) == (3, 1)  # int(4.8)=4; round(2/3)·3 = 3 task dims
    assert iso_cts_split(5, 2, 0.8) == (5, 0)  # int(4.0)=4; round(0.5)=0 (half to even)
    assert iso_cts_split(8, 2, 0.5) == (4, 2)
    assert iso_cts_split(4, 1, 0.0) == (0, 4)
    with pytest.raises(ValueError, match="common_space_fraction"):
        iso_cts_split(5, 3, 0.0)  # round(5/3)·3 = 6 > 5: FusionBench fails too


def test_iso_cts_matches_reference_formula():
    for shape, n, frac in [((6, 5), 2, 0.8), ((4, 7), 3, 0.5), ((8, 8), 2, 0.5), ((5, 5), 1, 0.0)]:
        ds = [rand(*shape, seed=10 * n + i) for i in range(n)]
        expected = np_iso_cts([d.numpy() for d in ds], frac)
        torch.testing.assert_close(run("iso_cts", ds, common_space_fraction=frac), torch.from_numpy(expected))


def test_iso_cts_all_common_equals_iso_c_and_mean_for_vectors():
    ds = [rand(5, 4, seed=i) for i in range(3)]
    torch.testing.assert_close(run("iso_cts", ds, common_space_fraction=1.0, lambda_=1.3),
                               run("iso_c", ds, lambda_=1.3))
    vs = [T([1.0, 2.0]), T([3.0, 5.0]), T([2.0, 2.0])]
    torch.testing.assert_close(run("iso_cts", vs), T([2.0, 3.0]))


# --- TSV-M ------------------------------------------------------------------------------------------


def test_tsv_m_hand_case():
    d1, d2 = T([[3.0, 0.0], [0.0, 1.0]]), T([[0.0, 0.0], [0.0, 2.0]])
    # k = 1: task 1 keeps 3·e1e1ᵀ, task 2 keeps 2·e2e2ᵀ; U = V = I already orthonormal
    torch.testing.assert_close(run("tsv_m", [d1, d2]), T([[3.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(run("tsv_m", [d1, d2], lambda_=0.5), T([[1.5, 0.0], [0.0, 1.0]]))
    # a 1-row matrix from two tasks: k = int(1·0.5) = 0, a zero update (as FusionBench)
    assert torch.equal(run("tsv_m", [T([[1.0, 2.0]]), T([[3.0, 4.0]])]), T([[0.0, 0.0]]))


def test_tsv_m_one_task_is_the_task_vector():
    full, low = rand(4, 3, seed=0), torch.outer(rand(4, seed=1), rand(3, seed=2))
    for d in (full, low):  # k = r: U, Vᵀ already orthonormal, nothing dropped (also when rank-deficient)
        torch.testing.assert_close(run("tsv_m", [d]), d)


def test_tsv_m_matches_reference_formula_and_weights():
    for shape, n in [((5, 4), 2), ((4, 6), 3), ((6, 6), 4)]:
        ds = [rand(*shape, seed=20 * n + i) for i in range(n)]
        expected = np_tsv_m([d.numpy() for d in ds])
        torch.testing.assert_close(run("tsv_m", ds), torch.from_numpy(expected))
    ds = [rand(5, 4, seed=i) for i in range(2)]
    torch.testing.assert_close(run("tsv_m", ds, weight=[2.0, 0.5]), run("tsv_m", [2.0 * ds[0], 0.5 * ds[1]]))
    vs = [T([1.0, 2.0]), T([3.0, 6.0])]
    torch.testing.assert_close(run("tsv_m", vs, weight=[1.0, 0.5], lambda_=2.0), T([2.5, 5.0]))


# --- contract: all five ----------------------------------------------------------------------------

METHODS = ["magmax", "model_stock", "iso_c", "iso_cts", "tsv_m"]


@pytest.mark.parametrize("method", METHODS)
def test_inputs_unchanged_shape_dtype_finite(method):
    base = rand(6, 5, seed=7).float()
    models = [base + 0.1 * rand(6, 5, seed=i).float() for i in range(3)]
    vec_models = [base[0] + 0.1 * rand(5, seed=i).float() for i in range(3)]
    spec = get_method(method)
    for b, ms in ((base, models), (base[0], vec_models)):
        b_copy, ms_copy = b.clone(), [m.clone() for m in ms]
        params = {p.name: [p.default] * 3 if p.per_model else p.default for p in spec.params}
        out = merge_tensor(spec, b, ms, params)
        assert torch.equal(b, b_copy) and all(torch.equal(m, c) for m, c in zip(ms, ms_copy))
        deltas = [m - b for m in ms]
        d_copy = [d.clone() for d in deltas]
        spec(b, deltas, params)
        assert all(torch.equal(d, c) for d, c in zip(deltas, d_copy))
        assert out.shape == b.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["magmax", "iso_c", "iso_cts", "tsv_m"])
def test_lambda_zero_gives_base(method):
    base = rand(6, 5, seed=7)
    models = [base + rand(6, 5, seed=i) for i in range(2)]
    out = merge_tensor(get_method(method), base, models, {"lambda": 0.0, "weight": [1.0, 1.0]},
                       compute_dtype=torch.float64)
    assert torch.equal(out, base)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "tsv_m"])
def test_half_precision_matrices_go_through_float32(method):
    ds = [rand(6, 5, seed=i) for i in range(2)]
    out = run(method, [d.to(torch.bfloat16) for d in ds])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), run(method, [d.float() for d in ds]), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("method", METHODS)
def test_public_merge_api(method):
    base = tiny_state(0)
    models = [perturbed(base, 0.05, seed=i + 1) for i in range(3)]
    recipe = Recipe(method=method, base_model="base", models=[ModelEntry(model=f"m{i}") for i in range(3)])
    out = merge(recipe, base=base, models=models)
    assert set(out) == set(base)
    assert torch.equal(out["position_ids"], base["position_ids"])
    spec = get_method(method)
    for k, v in base.items():
        if not v.is_floating_point():
            continue
        assert out[k].shape == v.shape and out[k].dtype == v.dtype and torch.isfinite(out[k]).all()
        params = {p.name: [p.default] * 3 if p.per_model else p.default for p in spec.params}
        torch.testing.assert_close(out[k], merge_tensor(spec, v, [m[k] for m in models], params))
    if method == "tsv_m":  # 6×6 layers, 3 tasks → k = 2: τ merged ≠ 0
        assert not torch.equal(out["layers.0.w"], base["layers.0.w"])


def test_svd_flag_by_tensor_name_in_a_recipe():
    base = tiny_state(0)
    models = [perturbed(base, 0.05, seed=i + 1) for i in range(2)]
    recipe = Recipe(
        method="iso_c", base_model="base", models=[ModelEntry(model="a"), ModelEntry(model="b")],
        parameters={"svd": [{"filter": "embed", "value": False}, {"value": True}]},
    )
    out = merge(recipe, base=base, models=models)
    mean = (models[0]["embed.weight"] + models[1]["embed.weight"]) / 2
    torch.testing.assert_close(out["embed.weight"], mean)  # FusionBench exclude_keys: plain mean
    deltas = [m["layers.1.w"] - base["layers.1.w"] for m in models]
    torch.testing.assert_close(out["layers.1.w"], base["layers.1.w"] + run("iso_c", deltas))


def test_an_svd_that_fails_to_converge_is_redone_in_float64(monkeypatch):
    """LAPACK's float32 SVD can fail on ill-conditioned task vectors; that one SVD is redone in float64."""
    import searchmerge.methods.subspace as sub

    real = torch.linalg.svd
    calls = []

    def flaky(a, full_matrices=True):
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(a, full_matrices=full_matrices)

    a = torch.randn(7, 5)
    want = real(a.double(), full_matrices=False)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    u, s, vh = sub._svd(a)
    assert calls == [torch.float32, torch.float64] and u.dtype == s.dtype == vh.dtype == torch.float32
    assert torch.equal(s, want[1].float()) and torch.equal(u, want[0].float())

    def always(a, full_matrices=True):
        raise torch.linalg.LinAlgError("no")

    monkeypatch.setattr(torch.linalg, "svd", always)
    with pytest.raises(torch.linalg.LinAlgError):  # a float64 failure is not retried: it propagates
        sub._svd(torch.eye(3, dtype=torch.float64))
