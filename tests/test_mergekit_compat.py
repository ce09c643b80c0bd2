"""MergeKit 0.1.5 parameter declarations (scope, default) against our registry; per-model gamma / epsilon."""

from __future__ import annotations

import pytest
import torch

from searchmerge.errors import RecipeError
from searchmerge.merge import merge, tensor_rng
from searchmerge.mergekit import SHARED_METHODS, from_mergekit, to_mergekit
from searchmerge.methods.registry import get_method
from searchmerge.methods.sparsify import sparsify
from searchmerge.recipe import Recipe, resolve_params
from tests.helpers import perturbed, tiny_state

PER_MODEL, SHARED = "NON_BASE", "SHARED"
GTA = {"weight": (PER_MODEL, 1.0), "density": (PER_MODEL, 1.0), "lambda": (SHARED, 1.0)}
#: MergeKit 0.1.5's declarations, read from its merge_methods/*.py (weight is required there; 1.0 here).
MERGEKIT = {
    "linear": {"weight": (PER_MODEL, 1.0), "normalize": (SHARED, True)},
    "task_arithmetic": {**GTA, "normalize": (SHARED, False)},
    "ties": {**GTA, "normalize": (SHARED, True), "rescale": (SHARED, False)},
    "dare_ties": {**GTA, "normalize": (SHARED, False), "rescale": (SHARED, True)},
    "dare_linear": {**GTA, "normalize": (SHARED, False), "rescale": (SHARED, True)},
    "breadcrumbs": {**GTA, "gamma": (PER_MODEL, 0.01), "normalize": (SHARED, False), "rescale": (SHARED, False)},
    "breadcrumbs_ties": {**GTA, "gamma": (PER_MODEL, 0.01), "normalize": (SHARED, False), "rescale": (SHARED, False)},
    "della": {**GTA, "epsilon": (PER_MODEL, 0.15), "normalize": (SHARED, True), "rescale": (SHARED, True)},
    "della_linear": {**GTA, "epsilon": (PER_MODEL, 0.15), "normalize": (SHARED, False), "rescale": (SHARED, True)},
    "sce": {"select_topk": (SHARED, 1.0)},
    "slerp": {"t": (SHARED, 0.5)},
    "nuslerp": {"weight": (PER_MODEL, 1.0), "nuslerp_flatten": (SHARED, True), "nuslerp_row_wise": (SHARED, False)},
    "karcher": {"max_iter": (SHARED, 10), "tol": (SHARED, 1e-5)},
    "model_stock": {"filter_wise": (SHARED, False)},
}
#: Declared by MergeKit but read only by a sparsifier the method does not have.
NO_EFFECT = {("task_arithmetic", "density")}
#: How our parameters spell MergeKit's booleans (the value at our default must be MergeKit's default).
RENAMED = {"normalize": ("merge_func", {"mean": True, "sum": False}), "rescale": ("rescale", {"l1": True, "none": False})}


def test_every_shared_method_is_walked():
    assert set(MERGEKIT) == set(SHARED_METHODS)


@pytest.mark.parametrize("method", sorted(MERGEKIT))
def test_scope_and_default_match_mergekit(method):
    spec = get_method(method)
    ours = {p.name: p for p in spec.params}
    for name, (scope, default) in MERGEKIT[method].items():
        if (method, name) in NO_EFFECT:
            cfg = {"merge_method": method, "base_model": "b", "models": [{"model": "a", "parameters": {name: 0.5}}]}
            assert from_mergekit(cfg).models[0].parameters == {}  # accepted, and dropped: MergeKit ignores it too
        elif name in ours and not (name == "normalize" and "merge_func" in ours):
            p = ours[name]
            assert p.per_model == (scope == PER_MODEL), (method, name)
            mapped = RENAMED["rescale"][1].get(p.default, p.default) if name == "rescale" else p.default
            assert mapped == default, (method, name, p.default)
        else:
            ours_name, values = RENAMED[name]
            assert ours_name in ours, (method, name)
            assert values[ours[ours_name].default] == default, (method, name)


def _gta_config(method: str, **extra) -> dict:
    return {
        "merge_method": method, "base_model": "base",
        "models": [{"model": "base"},
                   {"model": "a", "parameters": {"weight": 1.0, "density": 0.5, **extra.get("a", {})}},
                   {"model": "b", "parameters": {"weight": 0.5, "density": [0.3, 0.9], **extra.get("b", {})}}],
        "parameters": extra.get("global", {}),
    }


def test_per_model_gamma_and_epsilon_configs_from_the_wild_are_accepted():
    r = from_mergekit(_gta_config("breadcrumbs", a={"gamma": 0.02}, b={"gamma": [0.0, 0.1]}))
    assert r.models[0].parameters["gamma"] == 0.02
    r = from_mergekit(_gta_config("della", a={"epsilon": 0.1}, b={"epsilon": [{"filter": "mlp", "value": 0.05}, {"value": 0.2}]}))
    assert resolve_params(r, "h.0.mlp.w", 0.0)["epsilon"] == [0.1, 0.05]
    assert resolve_params(r, "h.0.attn.w", 0.0)["epsilon"] == [0.1, 0.2]
    assert from_mergekit(to_mergekit(r)) == r  # and back out, per model


def _reference_breadcrumbs(base, fts, weights, densities, gammas, consensus: bool, rescale: str = "none"):
    """MergeKit's GTA for breadcrumbs, written out per model (the sparsifier is tested equal to MergeKit's)."""
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        deltas = [sparsify(ft[k] - b, method="magnitude_outliers", density=d, gamma=g, rescale=rescale)
                  for ft, d, g in zip(fts, densities, gammas)]
        weighted = torch.stack([w * d for w, d in zip(weights, deltas)])
        if consensus:
            sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
            weighted = weighted * (weighted.sign() == sign)
        out[k] = b + weighted.sum(0)
    return out


@pytest.mark.parametrize("method, consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_per_model_gamma_gives_mergekit_tensors(method, consensus):
    base = tiny_state(0)
    fts = [perturbed(base, 0.1, s) for s in (1, 2)]
    r = Recipe(method=method, base_model="base",
               models=[{"model": "a", "parameters": {"gamma": 0.05, "density": 0.6}},
                       {"model": "b", "parameters": {"gamma": 0.2, "density": 0.5, "weight": 0.7}}])
    got = merge(r, base=base, models=fts)
    want = _reference_breadcrumbs(base, fts, [1.0, 0.7], [0.6, 0.5], [0.05, 0.2], consensus)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    same = r.model_copy(update={"models": [m.model_copy(update={"parameters": {**m.parameters, "gamma": 0.05}})
                                           for m in r.models]})
    assert any(not torch.equal(got[k], merge(same, base=base, models=fts)[k]) for k in got if got[k].is_floating_point())


def test_per_model_epsilon_is_used_per_model():
    base = tiny_state(0)
    fts = [perturbed(base, 0.1, s) for s in (1, 2)]
    r = Recipe(method="della_linear", base_model="base", seed=3,
               models=[{"model": "a", "parameters": {"epsilon": 0.05, "density": 0.5}},
                       {"model": "b", "parameters": {"epsilon": 0.3, "density": 0.5}}])
    got = merge(r, base=base, models=fts)
    k = "layers.1.w"
    rng = tensor_rng(3, k)
    want = base[k] + sum(sparsify(ft[k] - base[k], method="della_magprune", density=0.5, epsilon=e, rescale="l1", rng=rng)
                         for ft, e in zip(fts, (0.05, 0.3)))
    assert torch.equal(got[k], want)
    with pytest.raises(ValueError, match="model 1"):
        merge(r.model_copy(update={"models": [r.models[0], r.models[1].model_copy(
            update={"parameters": {"epsilon": 0.5, "density": 0.6}})]}), base=base, models=fts)


def test_rescale_true_for_ties_and_breadcrumbs_is_l1():
    base = tiny_state(0)
    fts = [perturbed(base, 0.1, s) for s in (1, 2)]
    r = from_mergekit(_gta_config("breadcrumbs", a={"gamma": 0.05}, b={"gamma": 0.1}, global_={}) |
                      {"parameters": {"rescale": True}})
    assert r.parameters["rescale"] == "l1"
    r = r.model_copy(update={"models": [m.model_copy(update={"model": n}) for m, n in zip(r.models, "ab")]})
    got = merge(r, base=base, models=fts)
    want = _reference_breadcrumbs(base, fts, [1.0, 0.5], [0.5, 0.3], [0.05, 0.1], False, rescale="l1")
    k = "layers.0.w"  # density gradient [0.3, 0.9] is 0.3 at depth 0
    assert torch.equal(got[k], want[k])
    assert from_mergekit(_gta_config("ties") | {"parameters": {"rescale": True}}).parameters["rescale"] == "l1"
    assert to_mergekit(r)["parameters"]["rescale"] is True
    with pytest.raises(RecipeError, match="trim_scope: model"):
        merge(Recipe(method="ties", base_model="base", models=[{"model": "a"}],
                     parameters={"density": 0.5, "rescale": "l1", "trim_scope": "model"}), base=base, models=fts[:1])


def test_our_only_parameters_are_not_silently_dropped():
    with pytest.raises(RecipeError, match="MergeKit's `sce` has no `lambda`"):
        from_mergekit({"merge_method": "sce", "base_model": "b", "models": [{"model": "a"}], "parameters": {"lambda": 0.5}})
    with pytest.raises(RecipeError, match="has no `lambda`"):
        to_mergekit(Recipe(method="sce", base_model="b", models=[{"model": "a"}], parameters={"lambda": 0.5}))
    assert from_mergekit({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "a"}],
                          "parameters": {"rescale": True}}).parameters == {}  # no effect without a sparsifier


@pytest.mark.timeout(300)
def test_store_is_bit_identical_with_per_model_gamma_and_epsilon(ray_session):
    from searchmerge.store import TaskVectorStore

    base = tiny_state(0)
    fts = [perturbed(base, 0.1, s) for s in (1, 2, 3)]
    names = ["a", "b", "c"]
    cases = [
        ("breadcrumbs", "gamma", [0.02, [0.0, 0.1], [{"filter": "layers.1", "value": 0.2}, {"value": 0.05}]], {}),
        ("breadcrumbs_ties", "gamma", [0.3, 0.01, 0.1], {"rescale": "l1"}),
        ("della", "epsilon", [0.05, 0.2, [0.1, 0.3]], {}),
        ("della_linear", "epsilon", [0.1, 0.25, 0.05], {}),
        ("ties", "density", [0.3, 0.6, [0.2, 0.9]], {"rescale": "l1"}),
    ]
    with TaskVectorStore.build(base, fts, names=names, cpus_per_actor=0.1, timeout_s=120) as store:
        for method, name, values, params in cases:
            r = Recipe(method=method, base_model="base", seed=7, parameters={"density": 0.5, **params},
                       models=[{"model": n, "parameters": {name: v, "weight": w}}
                               for n, v, w in zip(names, values, (0.7, 0.4, 1.1))])
            want = merge(r, base=base, models=fts)
            got = store.merge(r)
            for k in want:
                assert torch.equal(got[k], want[k]), (method, k)
