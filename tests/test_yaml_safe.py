"""The plain-YAML reader: syntax errors with position; tags, duplicate keys, bad aliases, non-mappings refused."""

from __future__ import annotations

import pytest

from searchmerge.bench.pool import BenchSpecError, read_bench_spec
from searchmerge.errors import RecipeError, YamlError
from searchmerge.io.yaml_safe import load_yaml, position_of, read_yaml_mapping
from searchmerge.mergekit import from_mergekit
from searchmerge.recipe import Recipe, load_recipe
from searchmerge.search.spec import SearchSpecError, read_search_spec


def _refused(text: str, match: str) -> None:
    with pytest.raises(YamlError, match=match):
        load_yaml(text, name="f.yaml")


def test_syntax_error_has_line_and_column():
    _refused("a: 1\nb: {c: 2\n", r"^f\.yaml:3:1: invalid YAML: while parsing a flow mapping")


def test_unclosed_quote_and_tabs():
    _refused('a: "x\n', r"f\.yaml:\d+:\d+: invalid YAML")
    _refused("a:\n\tb: 1\n", "indent with spaces, not tabs")


@pytest.mark.parametrize("text", [
    "!!python/object/apply:os.system ['echo hi']",
    "a: !!python/name:os.system\n",
    "a: !!binary aGVsbG8=\n",
    "a: !!set {x, y}\n",
    "a: !custom 1\n",
    "a: !!str 1\n",
])
def test_every_explicit_tag_is_refused(text):
    _refused(text, r"f\.yaml:1:\d+: YAML tag `.*` is not allowed — .*remove the tag")


def test_duplicate_keys_are_refused_not_last_wins():
    _refused("lambda: 0.3\nmethod: ties\nlambda: 0.9\n", r"f\.yaml:3:1: duplicate key `lambda` \(first at line 1\)")
    _refused("models:\n  - {model: a, model: b}\n", "duplicate key `model`")


def test_aliases_to_nowhere_and_recursive_aliases():
    _refused("a: *nothing\n", r"f\.yaml:1:4: invalid YAML: found undefined alias.*define the anchor")
    _refused("a: &x [1, *x]\n", "recursive alias")


def test_alias_bombs_are_refused():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    _refused("\n".join(lines) + "\n", "too large after expanding aliases")


def test_plain_aliases_and_merge_keys_still_work():
    data, _ = load_yaml("w: &w 0.5\nm: {weight: *w}\nbase: &b {x: 1}\nd: {<<: *b, y: 2}\n")
    assert data == {"w": 0.5, "m": {"weight": 0.5}, "base": {"x": 1}, "d": {"x": 1, "y": 2}}


def test_several_documents_refused():
    _refused("a: 1\n---\nb: 2\n", r"f\.yaml:2:1: .*one file holds one document")


def test_bad_bytes_refused():
    _refused(b"a: \xff\xfe\x00\n", "invalid YAML")
    _refused("a: \x07\n", "invalid YAML")


def test_dates_stay_strings():
    assert load_yaml("model: 2024-01-01\n")[0] == {"model": "2024-01-01"}


def test_positions_point_at_keys_and_values():
    _, pos = load_yaml("a:\n  b: [1, 2]\n", name="f.yaml")
    assert str(position_of(pos, ("a", "b", 1))) == "f.yaml:2:10"
    assert str(position_of(pos, ("a", "zzz"))) == "f.yaml:2:3"


@pytest.mark.parametrize("text, got", [("", "an empty document"), ("- a\n- b\n", "a list"), ("just text\n", "a str")])
def test_non_mapping_documents_refused(tmp_path, text, got):
    f = tmp_path / "x.yaml"
    f.write_text(text)
    with pytest.raises(RecipeError, match=f"a recipe must be a YAML mapping with `method`, `models`, got {got}"):
        load_recipe(f)
    with pytest.raises(SearchSpecError, match="a search spec must be a YAML mapping"):
        read_search_spec(f)
    with pytest.raises(BenchSpecError, match="a bench spec must be a YAML mapping"):
        read_bench_spec(f)


def test_a_folder_is_not_a_file(tmp_path):
    with pytest.raises(YamlError, match="is a folder"):
        read_yaml_mapping(tmp_path, what="recipe")


def test_every_reader_uses_the_plain_loader(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("a: 1\na: 2\n")
    for read, err in ((load_recipe, RecipeError), (read_search_spec, SearchSpecError), (read_bench_spec, BenchSpecError)):
        with pytest.raises(err, match="duplicate key `a`"):
            read(f)
    with pytest.raises(RecipeError, match="duplicate key"):
        Recipe.from_yaml("method: ties\nmethod: linear\n")
    with pytest.raises(RecipeError, match="tag"):
        from_mergekit("merge_method: !!python/object/apply:os.system [ls]\n")


def test_mergekit_config_errors_have_positions(tmp_path):
    f = tmp_path / "mk.yaml"
    f.write_text("merge_method: tiez\nbase_model: b\nmodels:\n  - model: a\n")
    with pytest.raises(RecipeError, match=r"mk\.yaml:1:15: .*did you mean `ties`\?"):
        load_recipe(f)
    f.write_text("merge_method: ties\nbase_model: b\nmodels:\n  - model: b\n  - model: a\n    parameters: {densty: 0.5}\n")
    with pytest.raises(RecipeError, match=r"mk\.yaml:6:18: .*did you mean `density`\?"):
        load_recipe(f)
    f.write_text("merge_method: ties\nbase_modle: b\nmodels: [{model: a}]\n")
    with pytest.raises(RecipeError, match=r"mk\.yaml:2:1: unknown MergeKit key `base_modle` — did you mean `base_model`\?"):
        load_recipe(f)
