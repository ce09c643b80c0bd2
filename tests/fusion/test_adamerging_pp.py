"""AdaMerging++: λ on TIES vectors (whole-model top-k, sign elected on the unweighted trimmed sum), the core's
`ties` option that makes its recipe exact (`elect_on: unweighted`, by hand), and the recipe reproduced from the
pool's folders."""

from __future__ import annotations

import pytest
import torch

from searchmerge.bench import load_bench
from searchmerge.fusion.adamerging import AdaMergingConfig, adamerge, recipe_with_paths, search_point, ties_vectors
from searchmerge.merge import merge
from searchmerge.recipe import Recipe

TAUS = [[1.0, -2.0, 0.5, 1.0], [-1.0, 1.0, -1.0, -1.0], [2.0, 0.5, 1.0, 0.0]]
WEIGHTS = [1.0, 3.0, 0.5]


def _ties(elect_on: str, merge_func: str = "sum") -> torch.Tensor:
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor(t)} for t in TAUS]
    recipe = Recipe(method="ties", base_model="b", models=[{"model": f"m{i}", "parameters": {"weight": w}}
                                                           for i, w in enumerate(WEIGHTS)],
                    parameters={"merge_func": merge_func, "elect_on": elect_on})
    return merge(recipe, base=base, models=models)["w"]


def test_ties_elect_on_unweighted_by_hand():
    # signs of Σ τ: [+2, -0.5, +0.5, 0 -> +]; kept entries scaled by their weight after the election
    assert torch.equal(_ties("unweighted"), torch.tensor([1 * 1.0 + 0.5 * 2.0, -2.0, 1 * 0.5 + 0.5 * 1.0, 1.0]))
    # MergeKit's election on w·τ: [1, -3, 1] -> -, [-2, 3, .25] -> +, [.5, -3, .5] -> -, [1, -3, 0] -> -
    assert torch.equal(_ties("weighted"), torch.tensor([-3.0, 3.25, -3.0, -3.0]))
    # mean: divided by the weights of the kept entries
    torch.testing.assert_close(_ties("unweighted", "mean"), torch.tensor([2.0 / 1.5, -2.0, 1.0 / 1.5, 1.0]))


def test_elect_on_is_not_exported_to_mergekit():
    from searchmerge.errors import RecipeError
    from searchmerge.mergekit import to_mergekit_yaml

    recipe = Recipe(method="ties", base_model="b", models=[{"model": "m0"}], parameters={"elect_on": "unweighted"})
    with pytest.raises(RecipeError, match="elect_on"):
        to_mergekit_yaml(recipe)


def _reference_ties_vectors(base, finetuned, density):
    """The AdaMerging repository's `ties_merging_split` (topk_values_mask, resolve_sign, disjoint_merge_split)
    written out on the flattened model, sorted keys; returns {key: [N, *shape]}."""
    keys = sorted(k for k, v in base.items() if v.is_floating_point())
    flat = torch.stack([torch.cat([(m[k].float() - base[k].float()).reshape(-1) for k in keys]) for m in finetuned])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = trimmed * torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    out, at = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = selected[:, at:at + n].reshape(len(finetuned), *base[k].shape)
        at += n
    return out


def test_ties_vectors_match_the_reference(fixture_bench):
    mp = fixture_bench.modelpool
    names = [t for t in fixture_bench.taskpool.names if t in mp.finetuned]
    ft = [mp.finetuned[t] for t in names]
    keys = [k for k, v in mp.base.items() if v.is_floating_point()]
    ours = ties_vectors(mp.base, ft, keys, 0.2)
    ref = _reference_ties_vectors(mp.base, ft, 0.2)
    for k in keys:
        assert torch.equal(ours[k], ref[k]), k
    kept = sum(int((ref[k] != 0).sum()) for k in keys) / sum(ref[k][0].numel() for k in keys) / len(ft)
    assert 0.05 < kept < 0.2  # trimmed to 20 %, then the disagreeing entries dropped


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_pp_recipe_reproduced_from_folders(fixture_zoo, tmp_path, granularity):
    bench = load_bench(fixture_zoo)
    res = adamerge(bench, AdaMergingConfig(granularity=granularity, steps=6, lr=5e-2, batch_size=64, ties=True))
    assert res.recipe.method == "ties" and res.recipe.parameters["elect_on"] == "unweighted"
    assert res.history[-1] < res.history[0]
    path = tmp_path / "adamerging_pp.yaml"
    path.write_text(recipe_with_paths(bench, res.recipe).to_yaml())
    out = merge(str(path))  # what `searchmerge merge adamerging_pp.yaml` runs
    assert set(out) == set(res.merged) and all(torch.equal(out[k], res.merged[k]) for k in out)
    # the merged weights are θ₀ + Σ λ τ̃ with τ̃ the reference's TIES vectors
    mp = bench.modelpool
    names = bench.taskpool.names
    ref = _reference_ties_vectors(mp.base, [mp.finetuned[t] for t in names], 0.2)
    for g, keys in enumerate(res.groups):
        col = 0 if granularity == "task" else g
        k = keys[0]
        expect = mp.base[k] + sum(res.coefficients[i, col] * ref[k][i] for i in range(len(names)))
        torch.testing.assert_close(out[k], expect)
    point = search_point(res, names)
    assert point["method"] == "ties" and point["trim_scope"] == "model" and set(point["weight"]) == set(names)


def test_adamerging_pp_parameters_checked():
    from searchmerge.bench.pool import BenchSpecError
    from searchmerge.fusion.jobs import resolve_params

    assert resolve_params("adamerging", {"ties": True})["ties_density"] == 0.2
    with pytest.raises(BenchSpecError, match="ties_density"):
        resolve_params("adamerging", {"ties": True, "ties_density": 0.0})
    with pytest.raises(BenchSpecError, match="expected bool"):
        resolve_params("adamerging", {"ties": "yes"})
