"""The CLI's one error path: every failure ends as one line on stderr and an exit code.

* bad input (a ``SearchmergeError`` that is not a ``RuntimeError``, or a bad command line): exit 2;
* a runtime failure (``StoreError``, ``ZooUnavailable``, an ``OSError`` such as a full disk): exit 1;
* anything unexpected (a bug): exit 1, one line naming the file the full traceback was written to
  (``--debug`` prints it instead); Ctrl-C: exit 130.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn

from searchmerge.errors import SearchmergeError
from searchmerge.suggest import did_you_mean

PREFIX = "searchmerge: error: "
INTERRUPTED = 130


def one_line(text: str) -> str:
    """A message on one line: its lines joined with ``; `` (pydantic and Ray errors span several)."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def console_width() -> int | None:
    """``None`` (the terminal's width) on a TTY; wide when piped, so tables never wrap mid-row at 80 columns."""
    return None if sys.stdout.isatty() else 240


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line (with a "did you mean" for a mistyped choice), exit 2."""

    def error(self, message: str) -> NoReturn:
        hit = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if hit:
            choices = re.findall(r"'([^']*)'", hit.group(2)) or [c.strip() for c in hit.group(2).split(",")]
            hint = did_you_mean(hit.group(1), choices)
            message = f"invalid choice `{hit.group(1)}` — {hint + ' ' if hint else ''}choose from {', '.join(choices)}"
        else:
            message = f"{message} — see `{self.prog} --help`"
        self.exit(2, f"{PREFIX}{one_line(message)}\n")


def crash_report(exc: BaseException) -> Path | None:
    """Write the full traceback of ``exc`` to a file (cache folder, else the temp folder); its path."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"searchmerge-crash-{stamp}-{os.getpid()}.txt"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    cache = os.environ.get("SEARCHMERGE_CACHE")
    for folder in ([Path(cache).expanduser() / "crash"] if cache else []) + [
        Path.home() / ".cache" / "searchmerge" / "crash", Path(tempfile.gettempdir())
    ]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(f"searchmerge {' '.join(sys.argv[1:])}\n\n{text}")
            return folder / name
        except OSError:
            continue
    return None


def run_command(fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace, *, debug: bool = False) -> int:
    """Run one subcommand; map every failure to one stderr line and an exit code."""
    try:
        return int(fn(args) or 0)
    except SearchmergeError as exc:
        if debug:
            traceback.print_exc()
        print(f"{PREFIX}{one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("searchmerge: interrupted", file=sys.stderr)
        return INTERRUPTED
    except OSError as exc:  # the environment failed (disk full, permission lost mid-run): not a bug
        if debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"{PREFIX}{where}{exc.strerror or one_line(str(exc))} — check the path, its permissions and free space",
              file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the one place unexpected errors are reported
        if debug:
            traceback.print_exc()
            return 1
        path = crash_report(exc)
        where = f"full traceback in {path}" if path else "rerun with --debug for the traceback"
        print(f"{PREFIX}unexpected {type(exc).__name__}: {one_line(str(exc))[:300]} — {where}; "
              "please report it (or rerun with --debug)", file=sys.stderr)
        return 1
