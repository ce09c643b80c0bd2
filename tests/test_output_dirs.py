"""Output folders: checked before work, the user's umask, --force replaces atomically, racing writers."""

from __future__ import annotations

import os
import stat
import threading
from collections import namedtuple

import pytest
from safetensors.torch import save_file

from searchmerge.cli import main
from searchmerge.errors import OutputError
from searchmerge.io import outdir
from searchmerge.io.outdir import check_output_dir, fresh_dir, staged_dir
from searchmerge.io.writer import atomic_write_text
from searchmerge.merge import merge
from searchmerge.recipe import Recipe
from tests.helpers import perturbed, tiny_state


@pytest.fixture
def zoo(tmp_path):
    base = tiny_state(0)
    paths = []
    for name, sd in [("base", base), ("a", perturbed(base, 0.1, 1)), ("b", perturbed(base, 0.1, 2))]:
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
        paths.append(tmp_path / name)
    return Recipe(method="task_arithmetic", base_model=str(paths[0]), models=[{"model": str(p)} for p in paths[1:]])


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_outputs_follow_the_umask(zoo, tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    out = merge(zoo, out=tmp_path / "out")
    assert _mode(out) == dir_mode
    assert _mode(out / "model.safetensors") == file_mode
    assert _mode(atomic_write_text(tmp_path / "x.yaml", "a: 1\n")) == file_mode


def test_unwritable_or_missing_locations_are_refused_before_work(tmp_path):
    with pytest.raises(OutputError, match="not a writable folder"):
        check_output_dir("/proc/nope/out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", force=True)
    with pytest.raises(OutputError, match="not a writable folder"):
        check_output_dir(tmp_path / "file" / "sub" / "out")
    check_output_dir(tmp_path / "new" / "deeper" / "out")  # missing parents are fine: they get created


def test_free_space_is_checked_before_merging(zoo, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda path: usage(10, 10, 10))
    with pytest.raises(OutputError, match="not enough free space: the output needs about"):
        merge(zoo, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_force_never_deletes_the_old_folder_before_the_new_one_is_complete(zoo, tmp_path, monkeypatch):
    out = merge(zoo, out=tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    import searchmerge.io.writer as writer

    def failing_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "save_file", failing_save)
    with pytest.raises(OSError):
        merge(zoo.with_parameters(**{"lambda": 0.5}), out=out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before  # the old folder is untouched
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    merge(zoo.with_parameters(**{"lambda": 0.5}), out=out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert _leftovers(tmp_path) == []


def test_two_racing_writers_one_wins_the_other_refuses(tmp_path):
    out = tmp_path / "out"
    first, second = staged_dir(out), staged_dir(out)
    a, b = first.__enter__(), second.__enter__()  # both checked: neither existed yet
    (a / "who").write_text("a")
    (b / "who").write_text("b")
    first.__exit__(None, None, None)
    with pytest.raises(OutputError, match="another process created the output folder meanwhile"):
        second.__exit__(None, None, None)
    assert (out / "who").read_text() == "a"
    assert _leftovers(tmp_path) == []


def test_two_racing_merges_leave_one_complete_folder(zoo, tmp_path):
    results: list[object] = []

    def run() -> None:
        try:
            results.append(merge(zoo, out=tmp_path / "out"))
        except OutputError as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, OutputError) for r in results) == 1
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_fresh_dir_restores_keeps_or_replaces(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with fresh_dir(out, force=True, on_failure="restore") as d:
            (d / "new").write_text("new")
            raise RuntimeError("fails midway")
    assert (out / "old").is_file() and not (out / "new").exists()
    with pytest.raises(RuntimeError):
        with fresh_dir(out, force=True, on_failure="keep"):
            raise RuntimeError("fails before writing")  # nothing new to keep: the old one comes back
    assert (out / "old").is_file()
    with pytest.raises(RuntimeError):
        with fresh_dir(out, force=True, on_failure="keep") as d:
            (d / "partial").write_text("resumable")
            raise RuntimeError("interrupted")
    assert (out / "partial").is_file()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".run.old-")]
    assert len(kept) == 1 and (kept[0] / "folder" / "old").is_file()  # the old one is kept, never deleted
    with fresh_dir(out, force=True) as d:
        (d / "done").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["done"]


def test_demo_refuses_an_existing_folder_without_force(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]


def test_search_force_keeps_the_old_run_until_the_new_one_finished(tmp_path, monkeypatch):
    import searchmerge.search.run as run
    from searchmerge.search.spec import parse_search_spec

    spec = parse_search_spec({"bench": "fixture", "methods": {"task_arithmetic": {"lambda": "search"}}})
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("old")

    def interrupted(spec, out, **kw):
        (out / "trials.parquet").write_text("partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_search", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.search(spec, out, force=True)
    assert (out / "trials.parquet").is_file()  # the new run stays, resumable
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".run.old-")]
    assert (kept[0] / "folder" / "summary.json").read_text() == "old"
    monkeypatch.setattr(run, "_search", lambda spec, out, **kw: (out / "summary.json").write_text("new"))
    run.search(spec, out, force=True)
    assert (out / "summary.json").read_text() == "new"
