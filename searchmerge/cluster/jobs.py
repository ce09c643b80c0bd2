"""``searchmerge search SPEC --address http://HEAD:8265``: submit the search as a Ray job from a laptop.

The job's working dir is this project folder (code, specs, experiments), uploaded by Ray; zoos, run folders,
caches and venvs stay behind (``.gitignore`` plus :data:`EXCLUDES`), so it stays far under Ray's 100 MiB
limit. The cluster's nodes have searchmerge's dependencies from ``cluster.yaml``'s setup commands; the
job runs the uploaded code with ``python -m searchmerge``. Run folders must be on storage the cluster
shares: an absolute path on an NFS / EFS mount, or an ``s3://`` / ``gs://`` URI (the job's driver stages the run
folder locally and mirrors it there, :mod:`searchmerge.io.remote`); a relative path would vanish with the job.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from searchmerge.cluster.connect import ClusterError, ClusterUnreachable, check_run_folder
from searchmerge.errors import SearchmergeError
from searchmerge.io.remote import is_uri

RAY_WORKING_DIR_LIMIT = 100 * 1024 * 1024
# gitignore syntax (Ray's): a leading "/" anchors to the working dir's top (`zoo` alone would drop the package
# searchmerge/bench/zoo); the rest match at any depth.
EXCLUDES = [".venv", "venv", ".git", "/runs", "/out", "/zoo", "/zoos", "**/__pycache__", "*.egg-info", ".pytest_cache",
            ".cache", ".hypothesis", "*.safetensors", "*.bin", "*.parquet", "*.pt", "*.ckpt"]


class JobFailed(SearchmergeError, RuntimeError):
    """The submitted job ended FAILED or STOPPED (a runtime failure: exit 1)."""


def _excluded(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for p in patterns:
        if p.startswith("/"):  # anchored: the path from the top, or one of its parent folders
            if any(fnmatch.fnmatch("/".join(parts[: i + 1]), p[1:]) for i in range(len(parts))):
                return True
            continue
        pat = p.removeprefix("**/")
        if fnmatch.fnmatch(rel, pat) or any(fnmatch.fnmatch(part, pat) for part in parts):
            return True
    return False


def working_dir_bytes(root: Path, patterns: list[str] = EXCLUDES) -> tuple[int, list[tuple[str, int]]]:
    """Bytes the upload would hold (after ``patterns``), and the five biggest top-level entries."""
    total, per_top = 0, {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if not _excluded(os.path.normpath(os.path.join(rel_dir, d)), patterns)]
        for f in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, f))
            if _excluded(rel, patterns):
                continue
            size = os.path.getsize(os.path.join(dirpath, f))
            total += size
            top = rel.split(os.sep)[0]
            per_top[top] = per_top.get(top, 0) + size
    return total, sorted(per_top.items(), key=lambda kv: -kv[1])[:5]


def job_runtime_env(working_dir: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job's runtime env: the project folder (minus :data:`EXCLUDES`), loopback-safe Ray settings.
    ``extra`` (``--runtime-env-json``) adds to it; credentials never go here (use the nodes' own roles)."""
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(EXCLUDES),
                           "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}}
    for k, v in (extra or {}).items():
        if k == "env_vars":
            env["env_vars"] = {**env["env_vars"], **v}
        elif k == "excludes":
            env["excludes"] = [*env["excludes"], *v]
        else:
            env[k] = v
    secret = [k for k in env["env_vars"] if any(s in k.upper() for s in ("SECRET", "TOKEN", "PASSWORD", "KEY"))]
    if secret:
        raise ClusterError(f"--runtime-env-json: env_vars {secret} look like credentials — a runtime env is stored in the "
                           "cluster's job table; give the nodes credentials through their IAM role / instance profile")
    return env


def parse_runtime_env_json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClusterError(f"--runtime-env-json is not JSON ({exc.msg} at column {exc.colno}) — e.g. "
                           "'{\"env_vars\": {\"OMP_NUM_THREADS\": \"1\"}}'") from None
    if not isinstance(value, dict):
        raise ClusterError(f"--runtime-env-json must be a JSON object, got {type(value).__name__}")
    return value


def search_entrypoint(spec: Path, out: str, working_dir: Path, flags: list[str]) -> str:
    """The job's command: the spec relative to the uploaded working dir; ``out`` on shared storage."""
    try:
        rel = spec.resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise ClusterError(f"spec {spec} is outside the working dir {working_dir}; a job sees only that folder — "
                           "move the spec into it") from None
    out = check_run_folder(out, probe=False)  # a URI: no credentials in it; the nodes' roles reach it, maybe not this laptop
    if not is_uri(out) and not os.path.isabs(out):
        raise ClusterError(f"--out {out}: a relative run folder would live in the job's temporary working dir and "
                           "vanish with it — give a path on storage every node shares (e.g. /mnt/shared/runs/x)")
    return shlex.join(["python", "-m", "searchmerge", "search", rel.as_posix(), "--out", out, *flags])


def submit_search(address: str, entrypoint: str, runtime_env: dict[str, Any], *, wait: bool = True,
                  poll_s: float = 1.0, out: Any = print) -> tuple[str, str]:
    """Submit ``entrypoint`` to the job server at ``address``; with ``wait``, stream its logs until it ends.
    Returns (job id, final status)."""
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient
    except ImportError as exc:  # pragma: no cover - ray[default] missing
        raise ClusterUnreachable("job submission needs ray[default] here: pip install 'searchmerge[jobs]'") from exc
    size, biggest = working_dir_bytes(Path(runtime_env["working_dir"]), runtime_env.get("excludes", EXCLUDES))
    if size > RAY_WORKING_DIR_LIMIT:
        top = ", ".join(f"{k} ({v / 2**20:.0f} MiB)" for k, v in biggest)
        raise ClusterError(f"the working dir would upload {size / 2**20:.0f} MiB, over Ray's 100 MiB limit; biggest: {top} "
                           "— add them to .gitignore or --runtime-env-json '{\"excludes\": [...]}'")
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterUnreachable(f"the job server at {address} refused the job: {exc}") from exc
    out(f"submitted {job_id} to {address} ({size / 2**20:.1f} MiB working dir): {entrypoint}")
    if not wait:
        return job_id, "PENDING"
    seen = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > seen:
            out(logs[seen:].rstrip("\n"))
            seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return job_id, str(status.value if hasattr(status, "value") else status)
        time.sleep(poll_s)
