"""A real Ray head on loopback for one test: `ray start --head --block` on free ports, its own temp dir, and a
stop that ends only the processes of that head (never `ray stop`, which stops every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Head:
    gcs: str  # 127.0.0.1:PORT
    dashboard: str  # http://127.0.0.1:PORT (the job server)
    temp_dir: Path
    log: Path


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process (Linux /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                out[int(d.name)] = (ppid, cmd)
    return out


def own_processes(temp_dir: Path) -> set[int]:
    """This head's processes: those whose command line names its temp dir (GCS, raylet, dashboard, agents,
    workers), and their descendants (a job's driver)."""
    procs = _procs()
    mine = {pid for pid, (_, cmd) in procs.items() if str(temp_dir) in cmd and pid != os.getpid()}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _) in procs.items() if ppid in mine and pid not in mine}
        mine |= kids
        grew = bool(kids)
    return mine


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _stop(proc: subprocess.Popen, temp_dir: Path) -> None:
    pids = own_processes(temp_dir)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)  # `ray start --block` ends its node's processes on SIGTERM
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    pids |= own_processes(temp_dir)
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    _signal(pids | own_processes(temp_dir), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its own session


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, ready_s: float = 90) -> Iterator[Head]:
    """Start a head bound to 127.0.0.1 (GCS, dashboard / job server, agents) with usage stats and auth off."""
    gcs, dash, client, agent_http, agent_grpc, metrics, env_agent, nm, om = free_ports(9)
    temp_dir = Path(tempfile.mkdtemp(prefix="smhead", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    log = temp_dir / "ray-start.log"
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={nm}",
           f"--object-manager-port={om}", f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats",
           f"--temp-dir={temp_dir}", "--object-store-memory=500000000"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | LOOPBACK_ENV
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv active, as on a node
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", temp_dir, log)
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job server did not answer within {ready_s:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield head
    except BaseException:
        _stop(proc, temp_dir)  # the temp dir (logs) stays for a look
        raise
    _stop(proc, temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)
