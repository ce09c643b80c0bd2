"""Output folders: checked before any work, created with the user's umask, replaced atomically.

Every command that writes a folder (``merge``, ``bench``, ``demo``, ``search``) goes through here, so they
agree: an existing folder is refused unless ``force``; ``force`` never deletes the old folder before the
new one is complete; two writers racing for one folder give one winner and one clear refusal.

* :func:`staged_dir` builds in a hidden sibling and renames it into place (``merge``, ``bench``).
* :func:`fresh_dir` builds in place (paths inside the folder stay valid: ``demo``, ``search``) with the old
  folder moved aside, and removed only once the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Literal

from searchmerge.errors import OutputError, message


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_umask(path: Path, mode: int = 0o777) -> None:
    """Give ``path`` the permissions a plain ``mkdir``/``open`` would have (temp files default to 0o700/0o600)."""
    os.chmod(path, mode & ~current_umask())


def _umask_files(folder: Path) -> None:
    """Files some writers create 0o600 (safetensors, mkstemp) get the umask's mode, as ``open`` would give."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            chmod_umask(path, 0o777 if path.stat().st_mode & 0o111 else 0o666)


def _existing_ancestor(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _can_create_in(folder: Path) -> bool:
    """Whether a folder can be created in ``folder``: tried for real (``os.access`` says yes to root on /proc)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".searchmerge-probe-", dir=folder))
        return True
    except OSError:
        return False


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def check_output_dir(out: str | Path, *, force: bool = False, needed_bytes: int | None = None) -> None:
    """Refuse an output folder before any work: exists (without ``force``), not a folder, parent not
    writable, or (when ``needed_bytes`` is known) too little free space."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(message("output exists and is not a folder", "choose another --out", out))
    if out.exists() and not force:
        raise OutputError(message("output folder already exists",
                                  "pass --force to replace it (the old one is kept until the new one is complete)"
                                  " or choose another --out", out))
    ancestor = _existing_ancestor(out)
    if not ancestor.is_dir() or not _can_create_in(ancestor):
        raise OutputError(message(f"cannot create the output folder: {ancestor} is not a writable folder",
                                  "choose another --out", out))
    if needed_bytes:
        free = shutil.disk_usage(ancestor).free
        if free < needed_bytes * 1.05:
            raise OutputError(message(f"not enough free space: the output needs about {_mb(needed_bytes)}, "
                                      f"{ancestor} has {_mb(free)} free", "free some space or choose another --out", out))


def _aside(out: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))


def _lost_race(out: Path) -> OutputError:
    return OutputError(message("another process created the output folder meanwhile; nothing was replaced",
                               "rerun with --force to replace it, or choose another --out", out))


def publish(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename the complete folder ``tmp`` to ``out``; with ``force`` the old ``out`` is removed only afterwards."""
    old = None
    if force and out.exists():
        old = _aside(out)
        os.replace(out, old / "folder")
    try:
        os.rename(tmp, out)  # a non-empty folder already at `out` makes this fail: the race's loser
    except OSError:
        if old is not None and not out.exists():
            os.replace(old / "folder", out)
            shutil.rmtree(old, ignore_errors=True)
        raise _lost_race(out) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling folder to fill; on success it becomes ``out`` atomically, on failure it is removed."""
    out = Path(out)
    check_output_dir(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        chmod_umask(tmp)
        yield tmp
        _umask_files(tmp)
        publish(tmp, out, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def fresh_dir(out: str | Path, *, force: bool = False, on_failure: Literal["restore", "keep"] = "restore") -> Iterator[Path]:
    """Create ``out`` (the old one, with ``force``, moved aside) and yield it; the old folder is deleted once the
    body succeeds. On failure: ``restore`` puts the old one back; ``keep`` leaves the partial new folder (e.g. to
    resume it) and tells where the old one is."""
    out = Path(out)
    check_output_dir(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if force and out.exists():
        old = _aside(out)
        os.replace(out, old / "folder")
    try:
        os.mkdir(out)
    except FileExistsError:
        if old is not None:
            print(f"searchmerge: the previous {out} is kept at {old / 'folder'}", file=sys.stderr)
        raise _lost_race(out) from None
    try:
        yield out
    except BaseException:
        empty = out.is_dir() and not any(out.iterdir())  # failed before writing anything: nothing to keep
        if old is not None and (on_failure == "restore" or empty):
            shutil.rmtree(out, ignore_errors=True)
            os.replace(old / "folder", out)
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            print(f"searchmerge: the previous {out} is kept at {old / 'folder'}", file=sys.stderr)
        elif on_failure == "restore" or empty:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
