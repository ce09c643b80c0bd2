"""Where a search runs: an existing cluster (``--address`` or ``RAY_ADDRESS``) or a local Ray bound to loopback.

``ray://`` and ``auto`` (and ``host:port`` of a GCS) connect this process to a cluster as its driver; an
``http(s)://`` address is a cluster's job server: the CLI then submits the search as a Ray job
(:mod:`searchmerge.cluster.jobs`) instead of driving it from here.
"""

from __future__ import annotations

import os
import re

from searchmerge.errors import SearchmergeError

LOOPBACK_ENV = {  # a local Ray: every address on 127.0.0.1, no usage reports, no token file
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}
_ADDRESS = re.compile(r"^(auto|local|ray://[^\s/]+(:\d+)?/?|https?://[^\s/]+(:\d+)?/?|[\w.\-]+:\d+)$")


class ClusterError(SearchmergeError, ValueError):
    """A cluster address or cluster spec is invalid (bad input: exit 2)."""


def check_run_folder(out: str | os.PathLike[str], *, probe: bool = True) -> str:
    """A run folder is a folder path (on a cluster: a mount every node shares) or a URI pyarrow can write
    (``s3://``, ``gs://``, ``file://``…: staged locally and mirrored, :mod:`searchmerge.io.remote`). A URI is
    checked before any work (no credentials in it; with ``probe``, reachable from here) and returned normalized."""
    from searchmerge.io.remote import check_uri, is_uri

    return check_uri(out, probe=probe) if is_uri(out) else os.fspath(out)


def resolve_address(address: str | None) -> str | None:
    """The address to use: ``address`` if given, else ``RAY_ADDRESS``, else ``None`` (start a local Ray)."""
    value = address if address is not None else os.environ.get("RAY_ADDRESS") or None
    if value is None:
        return None
    value = value.strip()
    if not _ADDRESS.match(value):
        src = "--address" if address is not None else "RAY_ADDRESS"
        raise ClusterError(
            f"{src} {value!r} is not a Ray address — use auto, ray://HOST:10001 (Ray Client), HOST:6379 (GCS) or "
            "http://HOST:8265 (the job server: the search is submitted as a Ray job)"
        )
    return None if value == "local" else value


def is_job_server(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))  # type: ignore[union-attr]


def connect(address: str | None, *, num_cpus: int | None = None) -> str:
    """Initialise Ray once in this process; returns ``"cluster"`` or ``"local"``.

    A cluster's resources are its own (``num_cpus`` is ignored: the cluster counts them); a local Ray gets
    ``num_cpus`` and binds to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return "cluster" if address else "local"
    if is_job_server(address):
        raise ClusterError(f"{address} is a job server address; submit with `searchmerge search --address {address}`")
    if address:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            raise ClusterUnreachable(f"cannot connect to the Ray cluster at {address}: {exc} — is it up "
                                     "(`ray status --address …`)?") from exc
        return "cluster"
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return "local"


class ClusterUnreachable(SearchmergeError, RuntimeError):
    """The cluster named by the address did not answer (a runtime failure: exit 1)."""
