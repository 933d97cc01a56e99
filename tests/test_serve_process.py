"""scripts/serve.py as a real process: startup, HTTP answers, API key, errors and shutdown."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from checkpoint_factory import (
    browsing_checkpoint,
    browsing_purchase_probability,
    corrupt_checkpoint,
)
from processes import (
    ROOT,
    free_port,
    process_group_members,
    run_to_exit,
    serve,
    wait_for_health,
)

API_KEY = "test-key-7f3a"


@pytest.mark.slow
def test_server_with_api_key_answers_only_keyed_requests(tmp_path):
    ckpt = browsing_checkpoint(tmp_path / "checkpoints" / "run" / "best.ckpt")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    key = {"X-API-Key": API_KEY}

    with serve(tmp_path, f"ckpt_path={ckpt}", f"port={port}", api_key=API_KEY) as process:
        wait_for_health(process, url, headers=key)
        unkeyed_health = httpx.get(f"{url}/health")
        unkeyed = httpx.post(f"{url}/predict", json={"browsing_time": [30.0]})
        wrong = httpx.post(
            f"{url}/predict", json={"browsing_time": [30.0]}, headers={"X-API-Key": "nope"}
        )
        answer = httpx.post(
            f"{url}/predict", json={"browsing_time": [5.0, 15.0, 30.0, 60.0]}, headers=key
        )
        rejected = httpx.post(f"{url}/predict", json={"browsing_time": [-2.0]}, headers=key)
        info = httpx.get(f"{url}/info", headers=key)
        healthcheck = docker_healthcheck_code().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        keyed_check = run_healthcheck(healthcheck, api_key=API_KEY)
        unkeyed_check = run_healthcheck(healthcheck, api_key=None)

    assert keyed_check.returncode == 0, keyed_check.stderr
    assert unkeyed_check.returncode != 0
    assert unkeyed_health.status_code == 401
    assert unkeyed.status_code == 401
    assert wrong.status_code == 401
    assert answer.status_code == 200
    assert answer.json()["predictions"] == [0.0, 0.0, 1.0, 1.0]
    expected = [browsing_purchase_probability(m) for m in [5.0, 15.0, 30.0, 60.0]]
    assert answer.json()["probabilities"] == pytest.approx(expected, abs=1e-6)
    assert rejected.status_code == 422
    assert "browsing_time" in rejected.json()["message"]
    assert info.json()["model"]["name"] == "browsing-demo"
    assert "send it as X-API-Key" in process.log_path.read_text()


@pytest.mark.slow
def test_server_finds_newest_checkpoint_and_stops_on_sigterm_to_its_pid(tmp_path):
    browsing_checkpoint(tmp_path / "checkpoints" / "only-run" / "best.ckpt", run_name="only-run")
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    with serve(tmp_path, f"port={port}", "workers=2") as process:
        wait_for_health(process, url)
        answer = httpx.post(f"{url}/predict", json={"browsing_time": [25.0]})
        name = httpx.get(f"{url}/info").json()["model"]["name"]

        # What docker stop does: SIGTERM to the main process only.
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while process_group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = process_group_members(process.pid)

    assert answer.json()["predictions"] == [1.0]
    assert name == "only-run"
    assert returncode == 0
    assert left == []
    log = process.log_path.read_text()
    assert f"POST http://127.0.0.1:{port}/predict" in log
    assert "Traceback" not in log
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["checkpoints", "serve.log"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "message"),
    [(None, "error: checkpoint not found"), (corrupt_checkpoint, "error: cannot read checkpoint")],
)
def test_unusable_checkpoint_exits_quickly_with_one_message(tmp_path, make, message):
    ckpt = tmp_path / "model.ckpt"
    if make is not None:
        make(ckpt)

    began = time.monotonic()
    result = run_to_exit(tmp_path, f"ckpt_path={ckpt}", f"port={free_port()}")
    elapsed = time.monotonic() - began

    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 15


@pytest.mark.slow
def test_port_in_use_exits_with_a_clear_message(tmp_path):
    ckpt = browsing_checkpoint(tmp_path / "best.ckpt")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        result = run_to_exit(tmp_path, f"ckpt_path={ckpt}", f"port={port}")

    assert result.returncode != 0
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", "")
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def docker_healthcheck_code() -> str:
    instructions = dockerfile_instructions()
    (healthcheck,) = [rest for keyword, rest in instructions if keyword == "HEALTHCHECK"]
    command = shlex.split(healthcheck.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    return command[2]


def run_healthcheck(code: str, api_key: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LIT_SERVER_API_KEY"}
    if api_key is not None:
        env["LIT_SERVER_API_KEY"] = api_key
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )


def test_dockerfile_installs_cpu_torch_of_the_tested_version():
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG")

    assert ("FROM", "python:3.11-slim") in instructions
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert torch.__version__.split("+")[0] == args["TORCH_VERSION"]


def test_dockerfile_copies_files_that_exist_and_are_not_ignored():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    sources = [
        source
        for keyword, rest in dockerfile_instructions()
        if keyword == "COPY"
        for source in rest.split()[:-1]
        if "${" not in source
    ]

    assert {"pyproject.toml", "README.md", "src/", "conf/", "scripts/"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") not in ignored, source
    assert {".venv", ".git", "logs"} <= ignored


def test_dockerfile_serves_the_copied_checkpoint_on_all_interfaces_as_non_root():
    instructions = dockerfile_instructions()
    (command,) = [json.loads(rest) for keyword, rest in instructions if keyword == "CMD"]
    copies = [rest for keyword, rest in instructions if keyword == "COPY"]
    (user,) = [rest for keyword, rest in instructions if keyword == "USER"]

    assert command[:2] == ["python", "scripts/serve.py"]
    assert {"host=0.0.0.0", "port=8000", "ckpt_path=/app/model.ckpt"} <= set(command)
    assert "${CHECKPOINT} /app/model.ckpt" in copies
    assert user not in ("root", "0")
    assert ("EXPOSE", "8000") in instructions
    assert "/health" in docker_healthcheck_code()
