"""The one CLI error path: every failure is one stderr line and an exit code (2 bad input, 1 runtime)."""

from __future__ import annotations

import re

import pytest

from searchmerge.cli import main
from searchmerge.errors import CheckpointError, OutputError, RecipeError, SearchmergeError, UsageError
from searchmerge.store.store import StoreError


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("searchmerge: error: "), err
    return err[0]


def test_exit_codes_follow_the_error_class():
    assert RecipeError("x").exit_code == 2
    assert CheckpointError("x").exit_code == 2
    assert OutputError("x").exit_code == 2
    assert UsageError("x").exit_code == 2
    assert StoreError("x").exit_code == 1  # a runtime failure


def test_version_and_help(capsys):
    with pytest.raises(SystemExit):
        from searchmerge.cli import build_parser

        build_parser().parse_args(["--version"])
    assert re.match(r"searchmerge \d+\.\d+", capsys.readouterr().out)
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "``" not in text
    assert "main job is `searchmerge search" in " ".join(text.split())
    assert "exit codes" in text


def test_unknown_command_suggests_the_closest(capsys):
    assert main(["mrge"]) == 2
    assert "did you mean `merge`?" in _one_error_line(capsys)


def test_missing_argument_is_one_line(capsys):
    assert main(["merge"]) == 2
    assert "--help" in _one_error_line(capsys)


def test_recipe_file_not_found(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "recipe file not found" in _one_error_line(capsys)


def test_yaml_syntax_error_names_file_line_column(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("method: ties\nparameters: {density: 0.5\n")
    assert main(["merge", str(f), "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys)
    assert re.search(r"bad\.yaml:\d+:\d+: invalid YAML", line) and " — " in line


def test_yaml_tag_is_refused_not_executed(tmp_path, capsys):
    f = tmp_path / "evil.yaml"
    f.write_text("method: !!python/object/apply:os.system ['touch pwned']\nmodels: []\n")
    assert main(["convert", str(f)]) == 2
    assert "tag `!!python/object/apply:os.system` is not allowed" in _one_error_line(capsys)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("typo, fix", [("tiez", "ties"), ("task_arithmetc", "task_arithmetic")])
def test_method_typo_gets_a_suggestion(tmp_path, capsys, typo, fix):
    f = tmp_path / "r.yaml"
    f.write_text(f"method: {typo}\nbase_model: b\nmodels: [{{model: a}}]\n")
    assert main(["convert", str(f)]) == 2
    line = _one_error_line(capsys)
    assert f"did you mean `{fix}`?" in line
    assert "r.yaml:1:9:" in line  # the position of the method's value


def test_parameter_typo_lamda_gets_a_suggestion_and_position(tmp_path, capsys):
    f = tmp_path / "r.yaml"
    f.write_text("method: ties\nbase_model: b\nmodels: [{model: a}]\nparameters:\n  lamda: 0.5\n")
    assert main(["convert", str(f)]) == 2
    line = _one_error_line(capsys)
    assert "did you mean `lambda`?" in line and "r.yaml:5:3:" in line


def test_unknown_top_level_key_suggests(tmp_path, capsys):
    f = tmp_path / "r.yaml"
    f.write_text("method: ties\nbase_modle: b\nmodels: [{model: a}]\n")
    assert main(["convert", str(f)]) == 2
    assert "did you mean `base_model`?" in _one_error_line(capsys)


def test_multi_problem_recipe_is_still_one_line(tmp_path, capsys):
    f = tmp_path / "r.yaml"
    f.write_text("method: ties\nmodels: [{model: a, extra: 1}]\ndtype: float8\n")
    assert main(["convert", str(f)]) == 2
    _one_error_line(capsys)


def test_output_location_checked_before_any_work(tmp_path, capsys):
    f = tmp_path / "r.yaml"
    f.write_text(f"method: task_arithmetic\nbase_model: {tmp_path / 'missing-base'}\nmodels: [{{model: a}}]\n")
    # the checkpoints do not exist either: the output location is refused first, before opening them
    assert main(["merge", str(f), "--out", "/proc/nope/out", "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert "/proc/nope/out" in line and "not a writable folder" in line


def test_unexpected_exception_is_one_line_with_a_traceback_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEARCHMERGE_CACHE", str(tmp_path / "cache"))
    import searchmerge.cli as cli

    def boom(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_cmd_methods", boom)
    assert main(["methods"]) == 1
    line = _one_error_line(capsys)
    assert "unexpected ZeroDivisionError: a bug" in line
    path = re.search(r"full traceback in (\S+);", line).group(1)
    assert "Traceback" in open(path).read()
    assert main(["methods", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_runtime_failure_exits_1(monkeypatch, capsys):
    import searchmerge.cli as cli

    def fail(args):
        raise StoreError("a store actor died — rerun")

    monkeypatch.setattr(cli, "_cmd_methods", fail)
    assert main(["methods"]) == 1
    assert "a store actor died" in _one_error_line(capsys)


def test_methods_lists_aliases_and_per_model_parameters_without_wrapping(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "weighted_average" in out and "dare_task_arithmetic" in out  # aliases
    assert "weight=1.0 (per model)" in out and "gamma=0.01 (per model)" in out
    rows = [line for line in out.splitlines() if line.startswith("│ ")]
    assert any("https://arxiv.org/abs/2306.01708" in line for line in rows)  # a reference not folded at 80 columns
    assert max(len(line) for line in out.splitlines()) > 80


def test_bench_methods_typo_is_refused_before_work(tmp_path, capsys):
    assert main(["bench", "fixture", "--methods", "tiez", "--out", str(tmp_path / "b")]) == 2
    line = _one_error_line(capsys)
    assert "did you mean `ties`?" in line
    assert not (tmp_path / "b").exists()


def test_bench_refuses_an_existing_out_without_force(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "leaderboard.md").write_text("old")
    assert main(["bench", "fixture", "--methods", "ties", "--out", str(tmp_path / "b")]) == 2
    assert "--force" in _one_error_line(capsys)
    assert (tmp_path / "b" / "leaderboard.md").read_text() == "old"


def test_bench_spec_name_typo_suggests_the_zoo(tmp_path, capsys):
    assert main(["bench", "fixtur", "--out", str(tmp_path / "b")]) == 2
    assert "did you mean `fixture`?" in _one_error_line(capsys)


def test_search_spec_field_and_searcher_typos_are_suggested(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("bench: fixture\nmethods: {task_arithmetic: {lambda: search}}\nbudgte: {trials: 2}\n")
    assert main(["search", str(f), "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys)
    assert "did you mean `budget`?" in line and "s.yaml:3:1:" in line
    f.write_text("bench: fixture\nmethods: {task_arithmetic: {lamda: search}}\n")
    assert main(["search", str(f), "--out", str(tmp_path / "run")]) == 2
    assert "did you mean `lambda`?" in _one_error_line(capsys)
    f.write_text("bench: fixture\nmethods: {task_arithmetic: {lambda: search}}\nsearcher: optuna_tp\n")
    assert main(["search", str(f), "--out", str(tmp_path / "run")]) == 2
    assert "did you mean `optuna_tpe`?" in _one_error_line(capsys)


def test_report_on_a_non_run_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "summary.json" in _one_error_line(capsys)


def test_every_error_class_is_a_searchmerge_error():
    from searchmerge.bench.pool import BenchSpecError
    from searchmerge.bench.zoo.common import ZooUnavailable
    from searchmerge.search.spec import SearchSpecError

    for cls in (BenchSpecError, SearchSpecError, StoreError, ZooUnavailable):
        assert issubclass(cls, SearchmergeError)
    assert ZooUnavailable("x").exit_code == 1 and BenchSpecError("x").exit_code == 2
