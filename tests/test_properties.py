"""Property-based (Hypothesis): valid recipes round-trip exactly through our YAML and MergeKit's; invalid
recipes, random documents and byte-level corruptions of YAML only ever raise searchmerge's own errors."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import yaml  # noqa: E402

from searchmerge.errors import SearchmergeError  # noqa: E402
from searchmerge.mergekit import SHARED_METHODS, from_mergekit, to_mergekit_yaml  # noqa: E402
from searchmerge.methods.registry import Param, get_method, list_methods  # noqa: E402
from searchmerge.recipe import Recipe, load_recipe, recipe_from_dict  # noqa: E402

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = ["org/model-a", "./ft/b", "/abs/c", "d"]
FILTERS = ["mlp", "self_attn", "layers.1", None]


def _number(p: Param) -> st.SearchStrategy:
    lo, hi = p.search_bounds() or (-2.0, 2.0)
    if p.kind is int:
        return st.integers(int(lo), int(hi))
    low_open = p.range is not None and p.range.low is not None and p.range.low_open and lo == p.range.low
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, exclude_min=low_open)


def _value(p: Param) -> st.SearchStrategy:
    if p.choices is not None:
        return st.sampled_from(list(p.choices))
    if p.kind is bool:
        return st.booleans()
    scalar = _number(p)
    if p.kind is int:
        return scalar
    gradient = st.lists(scalar, min_size=2, max_size=4)
    conditional = st.lists(st.fixed_dictionaries({"filter": st.sampled_from(FILTERS), "value": scalar}),
                           min_size=1, max_size=3)
    return st.one_of(scalar, gradient, conditional)


@st.composite
def recipes(draw, methods=None) -> Recipe:
    spec = get_method(draw(st.sampled_from(methods or [m.name for m in list_methods()])))
    hi = spec.max_models or 3
    n = draw(st.integers(spec.min_models, max(spec.min_models, min(hi, 3))))
    numeric_only = spec.prepare is not None  # whole-model steps need a single value per model
    params, models = {}, [{"model": name, "parameters": {}} for name in NAMES[:n]]
    for p in spec.params:
        value = _number(p) if numeric_only and p.kind in (float, int) and p.choices is None else _value(p)
        if p.name == "trim_scope":
            continue  # `model` forbids gradients elsewhere; covered by the unit tests
        if draw(st.booleans()):
            params[p.name] = draw(value)
        if p.per_model:
            for m in models:
                if draw(st.booleans()):
                    m["parameters"][p.name] = draw(value)
    data = {"method": spec.name, "models": models, "parameters": params, "seed": draw(st.integers(0, 2**31 - 1))}
    if spec.base == "required" or (spec.base == "optional" and draw(st.booleans())):
        data["base_model"] = "base/model"
    return recipe_from_dict(data)


@FAST
@given(recipes())
def test_valid_recipes_round_trip_through_our_yaml_exactly(recipe):
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


@FAST
@given(recipes(methods=list(SHARED_METHODS)))
def test_valid_recipes_round_trip_through_mergekit_yaml_exactly(recipe):
    try:
        text = to_mergekit_yaml(recipe)
    except SearchmergeError:
        return  # what MergeKit cannot express is refused with a message (never dropped)
    expected = recipe.model_copy(update={"seed": 0})  # MergeKit takes the seed on its command line, not in YAML
    if recipe.method == "linear":  # MergeKit's linear has no base (ours only copies config files from it)
        expected = expected.model_copy(update={"base_model": None})
    for back in (from_mergekit(yaml.safe_load(text)), from_mergekit(text)):
        if "weight" not in recipe.parameters and back.parameters.get("weight") == 1.0:
            # MergeKit requires `weight`: the exporter writes our default (1.0) explicitly
            back = back.model_copy(update={"parameters": {k: v for k, v in back.parameters.items() if k != "weight"}})
        assert back == expected


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.sampled_from(
        ["ties", "linear", "slerp", "weight", "density", "gamma", "a", "mlp", "*", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["method", "merge_method", "models", "model", "parameters", "base_model", "weight",
                         "density", "gamma", "epsilon", "lambda", "filter", "value", "dtype", "seed", "t",
                         "bench", "methods", "budget", "trials", "searcher", "objectives", "granularity",
                         "points_to_evaluate", "scheduler", "type"]),
        inner, max_size=5),
    max_leaves=20,
)


@FAST
@given(_json)
def test_invalid_documents_raise_only_our_errors(data):
    from searchmerge.search.spec import parse_search_spec

    for read in (recipe_from_dict, from_mergekit, parse_search_spec):
        try:
            read(data)
        except SearchmergeError:
            pass


@FAST
@given(recipes(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("xid")),
                           min_size=1, max_size=6))
def test_byte_corruptions_raise_only_our_errors(tmp_path_factory, recipe, edits):
    raw = bytearray(recipe.to_yaml().encode())
    for pos, byte, op in edits:
        i = pos % (len(raw) + 1)
        if op == "x" and i < len(raw):
            raw[i] ^= byte or 1
        elif op == "i":
            raw.insert(i, byte)
        elif i < len(raw):
            del raw[i]
    f = tmp_path_factory.mktemp("corrupt") / "r.yaml"
    f.write_bytes(bytes(raw))
    try:
        load_recipe(f)
    except SearchmergeError as exc:
        assert "\n" not in str(exc).strip() or str(exc).count("\n") < 3


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_our_errors(tmp_path_factory, raw):
    from searchmerge.search.spec import read_search_spec

    f = tmp_path_factory.mktemp("bytes") / "x.yaml"
    f.write_bytes(raw)
    for read in (load_recipe, read_search_spec):
        try:
            read(f)
        except SearchmergeError:
            pass
