"""Hand-computed cases and invariants for the task-arithmetic and spherical families."""

from __future__ import annotations

import math

import pytest
import torch

from searchmerge.merge import merge, merge_tensor, tensor_rng
from searchmerge.methods.registry import get_method
from searchmerge.methods.task_arithmetic import generalized_task_arithmetic
from searchmerge.recipe import Recipe
from tests.helpers import perturbed, tiny_state


def run(method: str, base, tensors, **params):
    """Merge one tensor through the public per-tensor entry point with defaults filled in."""
    spec = get_method(method)
    n = len(tensors)
    full = {p.name: ([p.default] * n if p.per_model else p.default) for p in spec.params}
    for k, v in params.items():
        full[k] = v
    return merge_tensor(spec, base, tensors, full, rng=tensor_rng(0, "t"))


def test_task_arithmetic_hand_case():
    base = torch.tensor([1.0, -1.0])
    out = run("task_arithmetic", base, [base + torch.tensor([1.0, 2.0]), base + torch.tensor([3.0, -1.0])], **{"lambda": 0.5})
    assert torch.allclose(out, torch.tensor([3.0, -0.5]))


def test_task_arithmetic_weights_and_normalize():
    base = torch.zeros(2)
    t = [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])]
    out = run("task_arithmetic", base, t, weight=[0.25, 0.5], normalize=True)
    assert torch.allclose(out, torch.tensor([0.5, 2.0]) / 0.75)


def test_ties_per_tensor_hand_case():
    base = torch.zeros(4)
    t1 = torch.tensor([3.0, -1.0, 0.5, -2.0])
    t2 = torch.tensor([-1.5, 2.5, 1.0, -0.25])
    # density .5: t1 keeps 3, -2 ; t2 keeps 2.5, -1.5 -> sums [1.5, 2.5, 0, -2] -> signs + + + -
    out_sum = run("ties", base, [t1, t2], density=[0.5, 0.5], merge_func="sum")
    assert torch.allclose(out_sum, torch.tensor([3.0, 2.5, 0.0, -2.0]))
    out_mean = run("ties", base, [t1, t2], density=[0.5, 0.5], merge_func="mean")
    assert torch.allclose(out_mean, torch.tensor([3.0, 2.5, 0.0, -2.0]))
    out_max = run("ties", base, [t1 * 2, t1], density=[1.0, 1.0], merge_func="max")
    assert torch.allclose(out_max, t1 * 2)


def test_ties_mean_divides_by_agreeing_weights():
    base = torch.zeros(3)
    t = [torch.tensor([1.0, 1.0, -1.0]), torch.tensor([3.0, -2.0, -3.0])]
    out = run("ties", base, t, weight=[1.0, 0.5], merge_func="mean")
    # weighted: [1, 1, -1], [1.5, -1, -1.5]; signs: + , + (0 -> +), - ; agree: [both], [first], [both]
    assert torch.allclose(out, torch.tensor([2.5 / 1.5, 1.0 / 1.0, -2.5 / 1.5]))


def _fusionbench_ties(base_sd, ft_sds, k: float, lam: float, merge_func: str):
    """Independent transcription of FusionBench's flattened TIES (ties_merging_utils) for comparison."""
    keys = sorted(base_sd)
    flat_ptm = torch.cat([base_sd[k_].reshape(-1) for k_ in keys])
    flat_ft = torch.stack([torch.cat([sd[k_].reshape(-1) for k_ in keys]) for sd in ft_sds])
    tv = flat_ft - flat_ptm
    d = tv.shape[1]
    kk = d - int(d * k)
    kth = tv.abs().kthvalue(kk, dim=1, keepdim=True).values
    trimmed = tv * (tv.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    rows = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * rows
    if merge_func == "sum":
        merged = sel.sum(0)
    elif merge_func == "mean":
        merged = sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
    else:
        merged = sel.abs().max(0).values * sign
    flat = flat_ptm + lam * merged
    out, i = {}, 0
    for k_ in keys:
        n = base_sd[k_].numel()
        out[k_] = flat[i : i + n].reshape(base_sd[k_].shape)
        i += n
    return out


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_ties_model_scope_matches_fusionbench(merge_func):
    base = {k: v for k, v in tiny_state(1).items() if v.is_floating_point()}
    fts = [perturbed(base, 0.1, s) for s in (1, 2, 3)]
    recipe = Recipe(method="ties", base_model="b", models=[{"model": f"m{i}"} for i in range(3)],
                    parameters={"density": 0.2, "lambda": 0.3, "merge_func": merge_func, "trim_scope": "model"})
    ours = merge(recipe, base=base, models=fts)
    ref = _fusionbench_ties(base, fts, 0.2, 0.3, merge_func)
    for k in base:
        assert torch.allclose(ours[k], ref[k], atol=1e-6), k


def test_ties_density_one_single_model_is_task_arithmetic():
    base = torch.randn(5, 4)
    ft = base + torch.randn(5, 4)
    for func in ("sum", "mean"):
        assert torch.allclose(run("ties", base, [ft], merge_func=func), ft, atol=1e-6)


def test_dare_density_one_is_task_arithmetic():
    base = torch.randn(6, 3)
    fts = [base + torch.randn(6, 3) for _ in range(2)]
    ta = run("task_arithmetic", base, fts, **{"lambda": 0.7})
    assert torch.allclose(run("dare_linear", base, fts, **{"lambda": 0.7}), ta, atol=1e-6)


def test_dare_drop_rate_and_inverse_rescale():
    base = torch.zeros(200_000)
    delta = torch.ones(200_000)
    out = run("dare_linear", base, [delta], density=[0.3], rescale="inverse")
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.3))
    l1 = run("dare_linear", base, [delta], density=[0.3], rescale="l1")
    assert math.isclose(l1.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-4)


def test_dare_is_seeded_per_tensor():
    base = torch.zeros(1000)
    fts = [torch.randn(1000)]
    spec = get_method("dare_linear")
    params = {"weight": [1.0], "density": [0.5], "lambda": 1.0, "rescale": "inverse", "normalize": False}
    a = merge_tensor(spec, base, fts, params, rng=tensor_rng(3, "x"))
    b = merge_tensor(spec, base, fts, params, rng=tensor_rng(3, "x"))
    c = merge_tensor(spec, base, fts, params, rng=tensor_rng(4, "x"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_breadcrumbs_drops_outliers_and_small():
    base = torch.zeros(10)
    delta = torch.arange(1.0, 11.0)  # magnitudes 1..10
    out = run("breadcrumbs", base, [delta], density=[0.5], gamma=[0.1])
    # keep 5 of 10: drop the top 1 (10) and the bottom 4 (1..4)
    assert torch.equal(out != 0, (delta >= 5) & (delta <= 9))


def test_della_rejects_bad_epsilon_and_is_seeded():
    base = torch.zeros(4, 50)
    fts = [torch.randn(4, 50), torch.randn(4, 50)]
    with pytest.raises(ValueError, match="density"):
        run("della", base, fts, density=[0.1, 0.1], epsilon=[0.2, 0.2])
    a = run("della", base, fts, density=[0.5, 0.5], epsilon=[0.1, 0.1])
    b = run("della", base, fts, density=[0.5, 0.5], epsilon=[0.1, 0.1])
    assert torch.equal(a, b)


def test_della_row_ranks_are_the_double_argsort():
    """DELLA's per-row ranks with one sort equal the reference's argsort(argsort(|δ|)), ties by index included."""
    from searchmerge.methods.sparsify import row_ranks

    g = torch.Generator().manual_seed(0)
    v = torch.round(torch.randn(7, 300, generator=g) * 3).abs()  # many exact ties (and zeros)
    assert torch.equal(row_ranks(v), torch.argsort(torch.argsort(v, dim=1, stable=True), dim=1))
    assert torch.equal(row_ranks(torch.tensor([[2.0, 1.0, 2.0, 0.0]])), torch.tensor([[2, 1, 3, 0]]))


def test_sce_hand_case():
    base = torch.zeros(2)
    t = [torch.tensor([1.0, -1.0]), torch.tensor([3.0, 1.0])]
    # energy: mean(t^2) = 1, 5 -> weights 1/6, 5/6 ; sums [4, 0] -> signs + +
    out = run("sce", base, t)
    expected0 = (1 / 6 * 1 + 5 / 6 * 3) / 1.0
    expected1 = (5 / 6 * 1) / (5 / 6)
    assert torch.allclose(out, torch.tensor([expected0, expected1]))


def test_linear_hand_case_and_identical_models():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.allclose(run("linear", None, [a, b], weight=[1.0, 3.0]), torch.tensor([2.5, 5.0]))
    assert torch.allclose(run("linear", None, [a, b], weight=[1.0, 3.0], normalize=False), torch.tensor([10.0, 20.0]))
    assert torch.allclose(run("linear", None, [a, a, a]), a)


def test_slerp_endpoints_orthogonal_and_colinear():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(run("slerp", v0, [v1], t=0.0), v0)
    assert torch.allclose(run("slerp", v0, [v1], t=1.0), v1, atol=1e-6)
    assert torch.allclose(run("slerp", v0, [v1], t=0.5), torch.tensor([math.sqrt(0.5)] * 2), atol=1e-6)
    # colinear: plain lerp
    assert torch.allclose(run("slerp", v0, [3 * v0], t=0.5), 2 * v0)


def test_nuslerp_without_and_with_base():
    v0, v1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    out = run("nuslerp", None, [v0, v1], weight=[1.0, 1.0])
    assert torch.allclose(out, torch.tensor([[math.sqrt(0.5)] * 2]), atol=1e-6)
    base = torch.tensor([[1.0, 1.0]])
    out = run("nuslerp", base, [base + v0, base + v1], weight=[1.0, 3.0])  # t = 0.75
    expected = base + torch.tensor([[math.sin(0.25 * math.pi / 2), math.sin(0.75 * math.pi / 2)]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_karcher_mean_of_orthogonal_unit_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = run("karcher", None, [a, b])
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5)] * 2), atol=1e-5)
    assert torch.allclose(run("karcher", None, [2 * a, 2 * a]), 2 * a)


# --- invariants over every method ------------------------------------------------------------------


def _methods_with_lambda():
    from searchmerge.methods.registry import list_methods

    return [m.name for m in list_methods() if any(p.name == "lambda" for p in m.params)]


@pytest.mark.parametrize("method", _methods_with_lambda())
def test_lambda_zero_gives_base(method):
    base = {k: v for k, v in tiny_state(2).items()}
    fts = [perturbed(base, 0.1, s) for s in (1, 2, 3)]
    spec = get_method(method)
    params = {"lambda": 0.0}
    if any(p.name == "density" for p in spec.params):
        params["density"] = 0.5
    recipe = Recipe(method=method, base_model="b", models=[{"model": f"m{i}"} for i in range(3)], parameters=params)
    out = merge(recipe, base=base, models=fts)
    for k in base:
        assert torch.allclose(out[k].float(), base[k].float()), (method, k)


@pytest.mark.parametrize("method", ["linear", "karcher", "ties", "task_arithmetic", "dare_ties", "sce"])
def test_merging_identical_models_gives_that_model(method):
    base = tiny_state(3)
    ft = perturbed(base, 0.1, 7)
    spec = get_method(method)
    params: dict = {}
    if method in ("task_arithmetic",):
        params["normalize"] = True
    if method in ("ties", "dare_ties"):
        params["merge_func"] = "mean"
    recipe = Recipe(method=method, base_model=None if spec.base == "optional" else "b",
                    models=[{"model": f"m{i}"} for i in range(3)], parameters=params)
    out = merge(recipe, base=None if spec.base == "optional" else base, models=[ft, ft, ft])
    for k in base:
        assert torch.allclose(out[k].float(), ft[k].float(), atol=1e-5), (method, k)


def _all_methods():
    from searchmerge.methods.registry import list_methods

    return [m.name for m in list_methods()]


@pytest.mark.parametrize("method", _all_methods())
def test_inputs_never_mutated_and_buffers_pass_through(method):
    spec = get_method(method)
    n = spec.min_models if spec.max_models == spec.min_models else max(spec.min_models, 3)
    if spec.max_models is not None:
        n = min(n, spec.max_models)
    base = tiny_state(4)
    fts = [perturbed(base, 0.1, s) for s in range(n)]
    snapshot = [{k: v.clone() for k, v in sd.items()} for sd in [base, *fts]]
    params = {"density": 0.5} if any(p.name == "density" for p in spec.params) else {}
    if method in ("della", "della_linear"):
        params["epsilon"] = 0.1
    recipe = Recipe(method=method, base_model=None if spec.base == "none" else "b",
                    models=[{"model": f"m{i}"} for i in range(n)], parameters=params)
    out = merge(recipe, base=None if spec.base == "none" else base, models=fts)
    for before, after in zip(snapshot, [base, *fts]):
        for k in before:
            assert torch.equal(before[k], after[k]), (method, k)
    assert torch.equal(out["position_ids"], base["position_ids"])
    for k, v in out.items():
        assert v.shape == base[k].shape and v.dtype == base[k].dtype
        assert torch.isfinite(v.float()).all(), (method, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", _all_methods())
def test_cuda_merge_matches_cpu(method):
    spec = get_method(method)
    n = spec.max_models if spec.max_models is not None else 3
    base = tiny_state(5)
    fts = [perturbed(base, 0.1, s) for s in range(n)]
    params = {"density": 0.5} if any(p.name == "density" for p in spec.params) else {}
    if method in ("della", "della_linear"):
        params["epsilon"] = 0.1
    recipe = Recipe(method=method, base_model=None if spec.base == "none" else "b",
                    models=[{"model": f"m{i}"} for i in range(n)], parameters=params)
    cpu = merge(recipe, base=base, models=fts)
    gpu = merge(recipe, base=base, models=fts, device="cuda")
    for k in cpu:
        assert gpu[k].device.type == "cuda"
        assert torch.allclose(gpu[k].cpu().float(), cpu[k].float(), atol=1e-4, rtol=1e-4), (method, k)


def test_magnitude_mask_equals_stable_argsort_top_k():
    from searchmerge.methods.sparsify import magnitude_mask

    g = torch.Generator().manual_seed(0)
    for density in (0.05, 0.2, 0.5, 0.93):
        delta = torch.randint(-5, 6, (37, 11), generator=g).float()  # many ties
        k = int(density * delta.numel())
        order = torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)[:k]
        expected = torch.zeros(delta.numel())
        expected[order] = 1
        got = magnitude_mask(delta, density)
        assert torch.equal(got.reshape(-1), expected) and int(got.sum()) == k


def test_outlier_mask_equals_stable_argsort_ranks():
    """Breadcrumbs' O(n) selection keeps exactly the entries ranked [n_bot, n − n_top) by a stable argsort."""
    from searchmerge.methods.sparsify import outlier_mask

    g = torch.Generator().manual_seed(1)
    for density, gamma in [(0.05, 0.01), (0.2, 0.1), (0.5, 0.05), (0.9, 0.2), (0.93, 0.0), (0.3, 0.0)]:
        delta = torch.randint(-5, 6, (37, 11), generator=g).float()  # many ties
        n = delta.numel()
        target, n_top = int(density * n), int(gamma * n)
        n_bot = n - target - n_top
        if n_bot < 0:
            n_top, n_bot = n_top + n_bot, 0
        order = torch.argsort(delta.abs().reshape(-1), stable=True)
        expected = torch.zeros(n)
        expected[order[n_bot : n - n_top]] = 1
        got = outlier_mask(delta, density, gamma)
        assert torch.equal(got.reshape(-1), expected), (density, gamma)
