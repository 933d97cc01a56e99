"""Start, probe and stop real server processes; every process started is stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from purchasenet.serving import WORKER_PROCESS_NAME

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "scripts" / "serve.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_group_members(pgid: int) -> list[int]:
    """PIDs still running in process group ``pgid`` (zombies excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def stop_process_group(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the server's process group, wait, and make sure no member is left."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    deadline = time.monotonic() + timeout
    while process_group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = process_group_members(process.pid)
    if left:
        os.killpg(process.pid, signal.SIGKILL)
    assert not left, f"server processes left running: {left}"


@contextmanager
def serve(cwd: Path, *overrides: str, api_key: str | None = None) -> Iterator[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k != "LIT_SERVER_API_KEY"}
    if api_key is not None:
        env["LIT_SERVER_API_KEY"] = api_key
    log_path = cwd / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(SERVE), *overrides],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process.log_path = log_path
    try:
        yield process
    finally:
        stop_process_group(process)


def wait_for_health(process: subprocess.Popen, url: str, headers=None, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{process.log_path.read_text()}")
        try:
            if httpx.get(url + "/health", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"server not healthy after {timeout} s:\n{process.log_path.read_text()}")


def run_to_exit(cwd: Path, *overrides: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run the server to its exit; the result also carries ``pid``, its process group's id."""
    process = subprocess.Popen(
        [sys.executable, str(SERVE), *overrides],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        stop_process_group(process)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    result.pid = process.pid
    return result


def wait_for_group_to_end(process: subprocess.Popen, timeout: float = 30.0) -> tuple[float, list]:
    """Seconds until no process of the server's group runs, and the PIDs left at the deadline."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if process.poll() is not None and not process_group_members(process.pid):
            break
        time.sleep(0.05)
    return time.monotonic() - began, process_group_members(process.pid)


def inference_workers(process: subprocess.Popen) -> list[int]:
    """PIDs of the server's inference workers, the processes named ``WORKER_PROCESS_NAME``."""
    workers = []
    for pid in process_group_members(process.pid):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name == WORKER_PROCESS_NAME:
            workers.append(pid)
    return workers
