"""The resident task-vector store gives the merge core's tensors for every registered method."""

from __future__ import annotations

import functools
import time

import pytest
import torch

from searchmerge.merge import merge as core_merge
from searchmerge.methods.registry import list_methods
from searchmerge.recipe import recipe_from_dict
from tests.helpers import make_gpt2_zoo, perturbed, tiny_state

NAMES = ["m0", "m1", "m2"]
#: non-default values for the parameters the built-ins share (others keep their defaults)
VALUES = {"density": 0.5, "lambda": 0.8, "gamma": 0.05, "epsilon": 0.1, "trim_density": 0.6, "t": 0.3,
          "select_topk": 0.5}
WEIGHTS = [0.7, 0.4, 1.1]


def _cases() -> list[tuple[str, str | None]]:
    cases = []
    for spec in list_methods():
        scopes = [None]
        if any(p.name == "trim_scope" for p in spec.params):
            scopes = ["tensor", "model"]
        cases += [(spec.name, s) for s in scopes]
    return cases


def make_recipe(method: str, trim_scope: str | None = None, n: int | None = None, seed: int = 3, **over):
    spec = next(s for s in list_methods() if s.name == method)
    if n is None:
        n = max(3, spec.min_models)
        if spec.max_models is not None:
            n = min(n, spec.max_models)
    params = {p.name: VALUES[p.name] for p in spec.params if p.name in VALUES and not p.per_model}
    per_model = [p.name for p in spec.params if p.per_model and (p.name in VALUES or p.name == "weight")]
    models = []
    for i in range(n):
        mp = {}
        for name in per_model:
            mp[name] = WEIGHTS[i] if name == "weight" else VALUES[name]
        models.append({"model": NAMES[i], "parameters": mp})
    if trim_scope is not None:
        params["trim_scope"] = trim_scope
    params.update(over)
    data = {"method": method, "models": models, "parameters": params, "seed": seed}
    if spec.base != "none":
        data["base_model"] = "base"
    return recipe_from_dict(data)


@pytest.fixture(scope="module")
def zoo():
    base = tiny_state(0)
    models = [perturbed(base, 0.1, seed=10 + i) for i in range(3)]
    return base, models


def core(recipe, zoo):
    base, models = zoo
    idx = [NAMES.index(m) for m in recipe.model_paths]
    return core_merge(recipe, base=base, models=[models[i] for i in idx])


@pytest.fixture(scope="module", params=[1, 2], ids=["1actor", "2actors"])
def store(request, ray_session, zoo):

    base, models = zoo
    s = build_store(base, models, names=NAMES, num_actors=request.param)
    yield s
    s.close()


def build_store(base, models, **kw):
    """A store whose actors reserve a sliver of CPU, so several coexist on the 2-CPU test cluster."""
    from searchmerge.store import TaskVectorStore


    kw.setdefault("cpus_per_actor", 0.1)
    kw.setdefault("timeout_s", 120)
    return TaskVectorStore.build(base, models, **kw)


def assert_same(got: dict, want: dict, exact: bool, atol: float = 1e-5) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        if exact or not want[k].is_floating_point():
            assert torch.equal(got[k], want[k]), (k, (got[k].float() - want[k].float()).abs().max())
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=atol)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method,scope", _cases(), ids=[f"{m}-{s}" if s else m for m, s in _cases()])
def test_store_matches_core(store, zoo, method, scope):
    recipe = make_recipe(method, scope)
    want = core(recipe, zoo)
    got = store.merge(recipe)
    # delta methods: bit-exact; weights methods rebuild θ_i = θ₀ + τ_i (one rounding), so a tight tolerance
    assert_same(got, want, exact=recipe.spec.inputs == "deltas")
    # a second trial with other coefficients reuses cached masks and is still exact
    if any(p.name == "lambda" for p in recipe.spec.params):
        r2 = recipe.with_parameters(**{"lambda": 0.3})
        assert_same(store.merge(r2), core(r2, zoo), exact=recipe.spec.inputs == "deltas")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_ties_unweighted_election_is_exact(store, zoo, scope):
    """AdaMerging++'s TIES (sign elected on the unweighted trimmed vectors, λ as per-model weights) is not the fused
    kernels' weighted election: the store takes its generic path and gives the core's tensors."""
    r = make_recipe("ties", scope, elect_on="unweighted", merge_func="sum")
    assert_same(store.merge(r), core(r, zoo), exact=True)


@pytest.mark.timeout(120)
def test_chunked_combine_is_exact(ray_session, zoo):
    """The elementwise combine stage run in 8-element chunks gives the whole-tensor bits."""

    base, models = zoo
    with build_store(base, models, names=NAMES, chunk_elems=8) as s:
        for method, scope in [("task_arithmetic", None), ("ties", "tensor"), ("ties", "model"),
                              ("dare_ties", "model"), ("della", None), ("breadcrumbs_ties", None)]:
            for merge_func in ("sum", "mean", "max") if method == "ties" else (None,):
                extra = {"merge_func": merge_func} if merge_func else {}
                r = make_recipe(method, scope, **extra)
                assert_same(s.merge(r), core(r, zoo), exact=True)


@pytest.mark.timeout(120)
def test_cache_and_thresholds_reused(ray_session, zoo):

    base, models = zoo
    with build_store(base, models, names=NAMES, cache_fraction=1.0) as s:
        r = make_recipe("ties", "tensor")
        s.merge(r)
        hits0 = s.stats()["cache_hits"]
        for lam in (0.2, 0.5, 1.0):
            rr = r.with_parameters(**{"lambda": lam})
            assert_same(s.merge(rr), core(rr, zoo), exact=True)
        st = s.stats()
        assert st["cache_hits"] >= hits0 + 3 * len([k for k in base if base[k].is_floating_point()])
        assert st["cache_bytes"] <= sum(a["cache_capacity"] for a in st["actors"])
        rm = make_recipe("ties", "model")
        s.merge(rm)
        s.merge(rm.with_parameters(**{"lambda": 0.1}))
        assert s.stats()["thresholds_cached"] == 1


@pytest.mark.timeout(120)
def test_subset_selection_and_names(ray_session, zoo):

    base, models = zoo
    with build_store(base, models, names=NAMES) as s:
        r = make_recipe("task_arithmetic", n=2)
        r = recipe_from_dict({**r.to_dict(), "models": [{"model": "m2"}, {"model": "m0"}]})
        assert_same(s.merge(r), core(r, zoo), exact=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_residency(ray_session, zoo, dtype):

    base, models = zoo
    with build_store(base, models, names=NAMES, residency_dtype=dtype) as s:
        st = s.stats()
        n = sum(v.numel() for v in base.values() if v.is_floating_point())
        assert st["resident_bytes"] == n * 4 + 3 * n * 2
        r = make_recipe("task_arithmetic")
        got, want = s.merge(r), core(r, zoo)
        err = max((got[k] - want[k]).abs().max().item() for k in want if want[k].is_floating_point())
        # |τ| ~ 0.1·N(0,1): bf16 keeps 8 bits of mantissa, so the error is a few 1e-3 at most
        assert 0 < err < (2e-3 if dtype == "bfloat16" else 3e-4)


@pytest.mark.timeout(300)
def test_inputs_immutable(ray_session, zoo):

    base, models = zoo
    with build_store(base, models, names=NAMES, num_actors=2) as s:
        before = s.digests()
        for _ in range(2):
            for method, scope in _cases():
                s.merge(make_recipe(method, scope, seed=_))
        assert s.digests() == before


@pytest.mark.timeout(300)
def test_gpt2_in_place_evaluator_matches_from_pretrained(ray_session, tmp_path):
    from transformers import AutoModelForCausalLM


    base_dir, dirs = make_gpt2_zoo(tmp_path / "zoo", n_models=2)
    recipe = recipe_from_dict({
        "method": "ties", "base_model": str(base_dir),
        "models": [{"model": str(d), "parameters": {"weight": w}} for d, w in zip(dirs, [0.6, 0.9])],
        "parameters": {"density": 0.4, "lambda": 0.7, "trim_scope": "model"},
    })
    out = core_merge(recipe, out=tmp_path / "merged")
    ids = torch.arange(20).reshape(2, 10)
    ref_model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = ref_model(ids).logits

    def logits(model, ids):
        return model(ids).logits

    for n_actors in (1, 2):
        with build_store(base_dir, dirs, num_actors=n_actors) as s:
            local = AutoModelForCausalLM.from_pretrained(base_dir).eval()
            ptrs = {k: v.data_ptr() for k, v in local.state_dict().items()}
            s.merge_into(recipe, local)
            assert {k: v.data_ptr() for k, v in local.state_dict().items()} == ptrs  # in place
            with torch.no_grad():
                assert torch.equal(local(ids).logits, want)
            ev = s.attach_evaluator(functools.partial(AutoModelForCausalLM.from_pretrained, base_dir))
            s.merge_into(recipe, ev)
            assert torch.equal(ev.run(logits, ids), want)
            # another trial, then back: the resident model follows the recipe, nothing accumulates
            s.merge_into(recipe.with_parameters(**{"lambda": 0.1}), ev)
            s.merge_into(recipe, ev)
            assert torch.equal(ev.run(logits, ids), want)


@pytest.mark.timeout(300)
def test_actor_kill_recovery(ray_session, zoo):
    import ray

    from searchmerge.store import StoreError

    base, models = zoo
    with build_store(base, models, names=NAMES, num_actors=2, timeout_s=60) as s:
        r = make_recipe("dare_ties", "model")
        want = core(r, zoo)
        assert_same(s.merge(r), want, exact=True)
        before = s.digests()
        pid = s.stats()["actors"][0]["pid"]
        ray.kill(s._actors[0], no_restart=False)
        time.sleep(0.5)  # ray.kill is asynchronous: a call sent in the same instant counts as in flight (below)
        assert_same(s.merge(r), want, exact=True)  # waits for the restart; rebuilt from the checkpoints
        assert s.stats()["actors"][0]["pid"] != pid
        assert s.digests() == before
        # a call in flight when its actor dies fails cleanly (an exception, not a hang); the store keeps working
        ref = s._actors[1].ping.remote(30)
        time.sleep(0.5)
        ray.kill(s._actors[1], no_restart=False)
        t0 = time.time()
        with pytest.raises(StoreError):
            s._get(ref)
        assert time.time() - t0 < 20
        assert_same(s.merge(r), want, exact=True)


@pytest.mark.timeout(120)
def test_timeout_is_an_exception(ray_session, zoo):
    from searchmerge.store import StoreError

    base, models = zoo
    with build_store(base, models, names=NAMES) as s:
        with pytest.raises(StoreError):  # no evaluator attached: a clean error from the actor
            s._get(s._actors[0].run.remote(len))
        t0 = time.time()
        with pytest.raises(StoreError, match="did not finish"):
            s._get(s._actors[0].ping.remote(3), timeout=0.5)
        assert time.time() - t0 < 2.5


def test_weighted_sum_into_is_bit_identical_to_combine():
    from searchmerge.store.stages import Combine, combine, weighted_sum_into

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=g)
    taus = [torch.randn(1000, generator=g) * 0.01 for _ in range(3)]
    for merge_func in ("sum", "mean"):
        c = Combine(weight=(0.3, 0.7, 1.1), lambda_=0.37, consensus=None, merge_func=merge_func)
        out = torch.empty(1000)
        weighted_sum_into(c, base, taus, out, chunk=96)
        assert torch.equal(out, base + combine(c, taus))
        bf = weighted_sum_into(c, base, [t.to(torch.bfloat16) for t in taus], torch.empty(1000), chunk=128)
        assert torch.equal(bf, base + combine(c, [t.to(torch.bfloat16).float() for t in taus]))


def test_mismatched_checkpoints_are_refused_before_any_actor_starts(zoo):
    from searchmerge.errors import CheckpointError
    from searchmerge.store import TaskVectorStore

    base, models = zoo
    bad = {**models[0], "layers.1.w": torch.zeros(6, 7)}
    with pytest.raises(CheckpointError, match=r"shape mismatch for tensor layers.1.w: base model has \[6, 6\]"):
        TaskVectorStore.build(base, [models[1], bad])
    missing = {k: v for k, v in models[0].items() if k != "layers.0.b"}
    with pytest.raises(CheckpointError, match=r"models\[0\] is missing tensor\(s\) \['layers.0.b'\]"):
        TaskVectorStore.build(base, [missing])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("num_actors", [1, 2])
def test_unit_weight_trials_reuse_the_merged_delta_exactly(ray_session, zoo, num_actors):
    """FusionBench-style recipes (no per-model weights): after one trial, only λ changes -> exact and cached."""
    base, models = zoo
    cases = [
        ("ties", {"density": 0.3, "merge_func": "sum", "trim_scope": "model"}),
        ("ties", {"density": 0.3, "merge_func": "mean"}),
        ("dare_ties", {"density": 0.5, "rescale": "inverse", "trim_density": 0.2, "trim_scope": "model"}),
        ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}),
        ("della", {"density": 0.5, "epsilon": 0.1}),
    ]
    with build_store(base, models, names=NAMES, num_actors=num_actors, cache_fraction=1.0) as s:
        for method, params in cases:
            first = recipe_from_dict({"method": method, "base_model": "base", "seed": 5,
                                      "models": [{"model": n} for n in NAMES], "parameters": params})
            assert_same(s.merge(first), core(first, zoo), exact=True)
            hits = s.stats()["cache_hits"]
            for lam in (0.1, 0.45, 1.3):
                r = first.with_parameters(**{"lambda": lam})
                assert_same(s.merge(r), core(r, zoo), exact=True)
            assert s.stats()["cache_hits"] > hits, method


@pytest.mark.timeout(300)
def test_weighted_ties_family_on_bf16_checkpoints_is_exact(ray_session, zoo):
    """bf16 checkpoints: the fused kernel runs chunk by chunk with casts (not zero-copy) and still gives the core's bits."""
    base, models = zoo
    base16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in base.items()}
    models16 = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in m.items()} for m in models]
    with build_store(base16, models16, names=NAMES, chunk_elems=8) as s:
        for method, scope in [("ties", "tensor"), ("ties", "model"), ("dare_ties", "tensor"), ("della", None),
                              ("dare_linear", None)]:
            r = make_recipe(method, scope)
            assert_same(s.merge(r), core_merge(r, base=base16, models=models16), exact=True)


@pytest.mark.timeout(300)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_store_on_cuda_matches_core(ray_session, zoo):
    """Shards resident in GPU memory (one GPU per actor) give the merge core's tensors."""
    base, models = zoo
    with build_store(base, models, names=NAMES, device="cuda") as s:
        assert all(a["device"].startswith("cuda") for a in s.stats()["actors"])
        for method, scope in [("task_arithmetic", None), ("ties", "tensor"), ("ties", "model"), ("dare_ties", "model"),
                              ("della", None), ("dare_linear", None)]:
            r = make_recipe(method, scope)
            assert_same(s.merge(r), core(r, zoo), exact=False, atol=1e-6)


def test_auto_device_is_cpu_without_gpus(ray_session, zoo):
    base, models = zoo
    if ray_session.available_resources().get("GPU", 0) > 0:
        pytest.skip("this Ray cluster has GPUs")
    with build_store(base, models, names=NAMES, device="auto") as s:
        assert {a["device"] for a in s.stats()["actors"]} == {"cpu"}


@pytest.mark.timeout(300)
def test_final_scale_methods_cache_their_unit_result_and_stay_exact(ray_session, zoo):
    """TSV-M / ISO-C / ISO-CTS end in ``·λ``: after one trial a new λ skips the SVDs, bit for bit the core's."""
    from searchmerge.methods.registry import get_method

    base, models = zoo
    assert {m for m in ("tsv_m", "iso_c", "iso_cts") if get_method(m).final_scale == "lambda"} == {"tsv_m", "iso_c", "iso_cts"}
    cases = [("tsv_m", {}), ("iso_c", {}), ("iso_cts", {"common_space_fraction": 0.5})]
    with build_store(base, models, names=NAMES, cache_fraction=1.0) as s:
        for method, params in cases:
            first = recipe_from_dict({"method": method, "base_model": "base",
                                      "models": [{"model": n} for n in NAMES], "parameters": params})
            assert_same(s.merge(first), core(first, zoo), exact=True)
            hits = s.stats()["cache_hits"]
            for lam in (0.1, 0.45, 1.3):
                r = first.with_parameters(**{"lambda": lam})
                assert_same(s.merge(r), core(r, zoo), exact=True)
            assert s.stats()["cache_hits"] > hits, method
        weighted = recipe_from_dict({"method": "tsv_m", "base_model": "base", "parameters": {"lambda": 0.7},
                                     "models": [{"model": n, "parameters": {"weight": 0.5 + i / 4}} for i, n in enumerate(NAMES)]})
        assert_same(s.merge(weighted), core(weighted, zoo), exact=True)  # other weights: another entry, still exact
