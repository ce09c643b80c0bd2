"""Run folders on remote storage: ``--out s3://…``, ``gs://…``, ``hdfs://…``, ``file://…`` (pyarrow filesystems).

A search never writes to the URI directly. It runs in a local *staging* folder (:func:`staging_dir`, named from
a hash of the URI) exactly like a local run folder (Tune's state, ``trials.parquet`` rewritten by rename, plots)
and mirrors it: the live files (:func:`live_paths`) after every finished trial, everything at the end.
``--resume`` pulls the URI into staging first. Each file is written atomically on the remote side: a temp
name then a rename where the filesystem renames (local, HDFS), else one put (an object store's put is atomic
per object, so a reader sees the old object or the new one, never half of one).

Credentials never go into a URI (it is copied into job tables and pickled Tune state): the nodes get access
from their role (instance profile, service account) or the environment of the process that runs the search.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl, urlsplit

from searchmerge.errors import OutputError

_SCHEME = re.compile(r"^([a-zA-Z][\w+.-]+):/")  # >= 2 letters: "C:/x" is a Windows path, not a URI
KNOWN_SCHEMES = {"file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}  # what pyarrow's from_uri builds
RENAMES = {"local", "hdfs"}  # filesystems whose move is a rename: temp name, then move
PROBE_TIMEOUT_S = 30.0  # S3 resolves a bucket's region on construction; GCS retries for minutes by default
_TMP = ".searchmerge-tmp-"
_SECRET = re.compile(r"secret|token|password|passwd|key|credential|signature", re.I)
MIRRORS: dict[str, str] = {}  # staging folder (resolved) -> URI, for the running search's TrialRecorder.flush


def is_uri(out: str | os.PathLike[str]) -> bool:
    """Whether ``out`` is a URI (``scheme://…``; also its ``Path``-collapsed form ``scheme:/…``)."""
    return bool(_SCHEME.match(os.fspath(out)))


def normalize(out: str | os.PathLike[str]) -> str:
    """``out`` as a URI string: ``Path("s3://b/x")`` reads ``s3:/b/x`` and ``Path("file:///x")`` reads ``file:/x``."""
    text = os.fspath(out)
    scheme, rest = text.split(":", 1)
    if rest.startswith("//"):
        return text
    return f"{scheme}://{'/' if scheme.lower() == 'file' else ''}{rest.lstrip('/')}"


def _fix(scheme: str) -> str:
    gcs = "give this machine (and every node) access through its service account or application default credentials"
    return {"s3": "give this machine (and every node) access through its IAM role / instance profile or AWS_PROFILE",
            "gs": gcs, "gcs": gcs}.get(scheme, "check the URI and that this machine can reach and write it")


def _error(flag: str, uri: str, what: str, fix: str) -> OutputError:
    return OutputError(f"{flag} {uri}: {what} — {fix}")


def _timed(fn: Callable[[], Any], seconds: float) -> Any:
    """``fn()`` in a daemon thread; ``TimeoutError`` if it does not answer within ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True, name="searchmerge-storage-probe")
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def check_uri(out: str | os.PathLike[str], *, probe: bool = True, flag: str = "--out") -> str:
    """The normalized URI, checked before any work: no credentials in it, a filesystem pyarrow can build and,
    with ``probe``, one this machine can reach (a ``get_file_info`` call). Raises one-line ``OutputError``s."""
    uri = normalize(out)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if "@" in parts.netloc or any(_SECRET.search(k) for k, _ in parse_qsl(parts.query)):
        shown = f"{scheme}://…"  # never echo a secret
        raise _error(flag, shown, "credentials in the URI (they would be stored with the job, the run's Tune state "
                     "and its logs)", _fix(scheme) + ", and give the URI without them")
    if not probe and scheme in KNOWN_SCHEMES:
        return uri  # checked where it runs (a job's nodes have their own roles)
    try:
        fs, path = _timed(lambda: _from_uri(uri), PROBE_TIMEOUT_S)
        if probe:
            _timed(lambda: fs.get_file_info(path), PROBE_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:  # ArrowInvalid is a ValueError
        text = " ".join(str(exc).split())[:300]
        if "Unrecognized filesystem type" in text or scheme not in KNOWN_SCHEMES:
            raise _error(flag, uri, f"pyarrow has no filesystem for {scheme}:// URIs",
                         "use s3://, gs://, hdfs:// or file://, or a folder path on a shared mount "
                         "(NFS, EFS, Filestore) such as /mnt/shared/runs/NAME") from None
        raise _error(flag, uri, f"cannot use this storage ({text})", _fix(scheme)) from None
    return uri


def _from_uri(uri: str) -> tuple[Any, str]:
    from pyarrow.fs import FileSystem

    fs, path = FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def staging_dir(uri: str, purpose: str = "run") -> Path:
    """The local folder a search for ``uri`` runs in (``SEARCHMERGE_STAGING``, else the system temp dir)."""
    uri = normalize(uri)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = re.sub(r"[^\w.-]", "_", urlsplit(uri).path.rstrip("/").rsplit("/", 1)[-1]) or "root"
    root = Path(os.environ.get("SEARCHMERGE_STAGING") or Path(tempfile.gettempdir()) / "searchmerge-staging")
    return root / f"{name}-{digest}" / purpose


def clear(local: Path) -> Path:
    """``local`` as an empty folder (staging is a cache of the URI: nothing in it is the only copy)."""
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True, exist_ok=True)
    return local


def _remote_files(fs: Any, base: str) -> dict[str, Any]:
    from pyarrow.fs import FileSelector, FileType

    out = {}
    for info in fs.get_file_info(FileSelector(base, recursive=True, allow_not_found=True)):
        if info.type == FileType.File:
            rel = info.path[len(base):].lstrip("/")
            if not rel.rsplit("/", 1)[-1].startswith(_TMP):  # a push cut short: not part of the folder
                out[rel] = info
    return out


def listing(uri: str) -> list[str]:
    """The files under ``uri`` (relative posix paths, sorted)."""
    fs, base = _from_uri(normalize(uri))
    return sorted(_remote_files(fs, base))


def exists(uri: str, rel: str = "") -> bool:
    """Whether ``uri`` (or ``uri/rel``, a file or a folder) holds anything."""
    fs, base = _from_uri(normalize(uri))
    files = _remote_files(fs, base)
    return any(k == rel or k.startswith(rel.rstrip("/") + "/") for k in files) if rel else bool(files)


def pull(uri: str, local: str | Path, *, skip: Iterable[str] = ()) -> int:
    """Replace ``local`` with a copy of the folder at ``uri`` (``skip``: top-level names left out). Returns files."""
    fs, base = _from_uri(normalize(uri))
    local = clear(Path(local))
    skip = set(skip)
    n = 0
    for rel in _remote_files(fs, base):
        if rel.split("/", 1)[0] in skip:
            continue
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{base}/{rel}") as src, open(dest, "wb") as fh:
            shutil.copyfileobj(src, fh, 8 << 20)
        n += 1
    return n


def _expand(local: Path, paths: Iterable[str] | None) -> list[str]:
    if paths is None:
        paths = [p.name for p in sorted(local.iterdir())]
    out = []
    for rel in paths:
        p = local / rel
        if p.is_dir():
            out += sorted(f.relative_to(local).as_posix() for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            out.append(Path(rel).as_posix())
    return [r for r in out if not r.rsplit("/", 1)[-1].startswith(_TMP)]


def push(local: str | Path, uri: str, paths: Iterable[str] | None = None) -> int:
    """Copy ``paths`` (files or folders relative to ``local``; default everything) to ``uri``, each file atomically.
    Returns the number of files written."""
    fs, base = _from_uri(normalize(uri))
    local = Path(local)
    rename = fs.type_name in RENAMES
    made: set[str] = set()
    files = _expand(local, paths)
    for rel in files:
        dest = f"{base}/{rel}"
        parent = dest.rsplit("/", 1)[0]
        if rename and parent not in made:
            fs.create_dir(parent, recursive=True)
            made.add(parent)
        target = f"{parent}/{_TMP}{uuid.uuid4().hex[:8]}-{rel.rsplit('/', 1)[-1]}" if rename else dest
        with open(local / rel, "rb") as src, fs.open_output_stream(target) as out:
            shutil.copyfileobj(src, out, 8 << 20)
        if rename:
            fs.move(target, dest)
    return len(files)


def prune(local: str | Path, uri: str) -> int:
    """Delete the files under ``uri`` that ``local`` does not have (``--force``: what is left of the old run), and
    the folders that leaves empty where folders exist (local, HDFS). Returns the files deleted."""
    from pyarrow.fs import FileSelector, FileType

    fs, base = _from_uri(normalize(uri))
    local = Path(local)
    keep = set(_expand(local, None))
    gone = [rel for rel in _remote_files(fs, base) if rel not in keep]
    for rel in gone:
        fs.delete_file(f"{base}/{rel}")
    if fs.type_name in RENAMES:
        dirs = [i.path for i in fs.get_file_info(FileSelector(base, recursive=True)) if i.type == FileType.Directory]
        for d in sorted(dirs, key=len, reverse=True):
            if not (local / d[len(base):].lstrip("/")).is_dir():
                fs.delete_dir(d)
    return len(gone)


def mirror_flush(local: str | Path, tune_state: str | None = None) -> None:
    """After ``trials.parquet`` was rewritten in ``local``: if a search mirrors ``local``, push what a resume needs,
    cheap enough for every trial: Tune's experiment state, ``spec.yaml`` and ``trials.parquet`` (last).

    Tune's state is taken from ``tune_state``, the folder Tune saves it to on the driver (in this thread, between
    callbacks: a consistent set), not from ``local/tune``, which Tune's background sync rewrites file by file —
    an experiment state newer than its searcher's state does not restore. The per-trial folders wait for the end."""
    from searchmerge.search.driver import TUNE_DIR

    local = Path(local)
    uri = MIRRORS.get(str(local.resolve()))
    if not uri:
        return
    with tempfile.TemporaryDirectory(prefix="searchmerge-push-") as tmp:
        snap = Path(tmp)
        (snap / TUNE_DIR).mkdir()
        paths = []
        state = sorted(f for f in Path(tune_state).iterdir() if f.is_file() and f.suffix in (".json", ".pkl")) \
            if tune_state and Path(tune_state).is_dir() else []
        for f in [local / TUNE_DIR / "tuner.pkl", *state]:  # tuner.pkl: written once, when the search starts
            if f.is_file():
                shutil.copyfile(f, snap / TUNE_DIR / f.name)
                paths.append(f"{TUNE_DIR}/{f.name}")
        for name in ("spec.yaml", "trials.parquet"):  # written by rename
            if (local / name).is_file():
                shutil.copyfile(local / name, snap / name)
                paths.append(name)
        push(snap, uri, paths)
