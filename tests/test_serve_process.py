"""scripts/serve.py as a real process: startup, HTTP answers, API key, errors and shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from checkpoint_factory import (
    browsing_checkpoint,
    browsing_purchase_probability,
    code_running_checkpoint,
    code_running_pickle,
    corrupt_checkpoint,
    foreign_checkpoint,
    incomplete_checkpoint,
    overflowing_browsing_checkpoint,
)
from processes import (
    ROOT,
    free_port,
    inference_workers,
    process_group_members,
    run_to_exit,
    serve,
    wait_for_group_to_end,
    wait_for_health,
)

API_KEY = "test-key-7f3a"
JSON = {"Content-Type": "application/json"}


@pytest.mark.slow
def test_server_with_api_key_answers_only_keyed_requests(tmp_path):
    ckpt = browsing_checkpoint(tmp_path / "checkpoints" / "run" / "best.ckpt")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    key = {"X-API-Key": API_KEY}

    with serve(tmp_path, f"ckpt_path={ckpt}", f"port={port}", api_key=API_KEY) as process:
        wait_for_health(process, url)
        unkeyed = httpx.post(f"{url}/predict", json={"browsing_time": [30.0]})
        wrong = httpx.post(
            f"{url}/predict", json={"browsing_time": [30.0]}, headers={"X-API-Key": "nope"}
        )
        unkeyed_garbage = httpx.post(f"{url}/predict", content=b"\xff{", headers=JSON)
        answer = httpx.post(
            f"{url}/predict", json={"browsing_time": [5.0, 15.0, 30.0, 60.0]}, headers=key
        )
        rejected = httpx.post(f"{url}/predict", json={"browsing_time": [-2.0]}, headers=key)
        unkeyed_info = httpx.get(f"{url}/info")
        info = httpx.get(f"{url}/info", headers=key)
        unkeyed_health = httpx.get(f"{url}/health")
        healthcheck = docker_healthcheck_code().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        probe_without_key = run_healthcheck(healthcheck, api_key=None)

    assert unkeyed.status_code == 401
    assert unkeyed.json()["message"] == "missing or wrong API key: send it in the X-API-Key header"
    assert wrong.status_code == 401
    assert unkeyed_garbage.status_code == 401
    assert answer.status_code == 200
    assert answer.json()["predictions"] == [0.0, 0.0, 1.0, 1.0]
    expected = [browsing_purchase_probability(m) for m in [5.0, 15.0, 30.0, 60.0]]
    assert answer.json()["probabilities"] == pytest.approx(expected, abs=1e-6)
    assert rejected.status_code == 422
    assert "browsing_time" in rejected.json()["message"]
    assert unkeyed_info.status_code == 401
    assert info.json()["model"]["name"] == "browsing-demo"
    assert unkeyed_health.status_code == 200
    assert probe_without_key.returncode == 0, probe_without_key.stderr
    log = process.log_path.read_text()
    assert "send it as X-API-Key to every endpoint but /health" in log
    assert API_KEY not in log


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
        elapsed, left = wait_for_group_to_end(process)
        returncode = process.wait(timeout=1)

    assert answer.json()["predictions"] == [1.0]
    assert name == "only-run"
    assert returncode == 0
    assert left == []
    assert elapsed < 10
    log = process.log_path.read_text()
    assert f"POST http://127.0.0.1:{port}/predict" in log
    assert "Traceback" not in log
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["checkpoints", "serve.log"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, "error: checkpoint not found"),
        (corrupt_checkpoint, "error: cannot read checkpoint"),
        (foreign_checkpoint, "is not a purchasenet checkpoint (no 'purchasenet' section)"),
        (incomplete_checkpoint, "is not a usable purchasenet checkpoint (missing entry 'net')"),
    ],
)
def test_unusable_checkpoint_exits_quickly_with_one_message(tmp_path, make, message):
    ckpt = tmp_path / "model.ckpt"
    if make is not None:
        make(ckpt)
    port = free_port()

    began = time.monotonic()
    result = run_to_exit(tmp_path, f"ckpt_path={ckpt}", f"port={port}")
    elapsed = time.monotonic() - began

    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 15
    assert_nothing_left(result, port)


@pytest.mark.slow
@pytest.mark.parametrize("make", [code_running_checkpoint, code_running_pickle])
def test_checkpoint_with_pickled_code_is_refused_and_the_code_never_runs(tmp_path, make):
    marker = tmp_path / "created-by-the-checkpoint"
    ckpt = make(tmp_path / "model.ckpt", marker)
    port = free_port()

    result = run_to_exit(tmp_path, f"ckpt_path={ckpt}", f"port={port}")

    assert result.returncode != 0
    assert "refusing to load" in result.stderr
    assert "unpickling it could run code" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert_nothing_left(result, port)
    # The trap is real: loading a copy without weights_only creates the file. (Torch then
    # finds that a plain pickle is no checkpoint, but only after running it.)
    with contextlib.suppress(RuntimeError):
        torch.load(make(tmp_path / "copy.ckpt", tmp_path / "proof"), weights_only=False)
    assert (tmp_path / "proof").exists()


def assert_nothing_left(result: subprocess.CompletedProcess, port: int) -> None:
    """No process of the server's group runs and nothing listens on its port."""
    assert process_group_members(result.pid) == []
    with socket.socket() as client:
        assert client.connect_ex(("127.0.0.1", port)) != 0


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


def start_upload_that_never_finishes(port: int) -> socket.socket:
    """A client that promises a body and sends one byte of it, as a stalled network would."""
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(
        b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    return client


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "to_group", "stalled_client"),
    [
        (signal.SIGINT, True, True),
        (signal.SIGINT, False, False),
        (signal.SIGTERM, True, False),
    ],
    ids=["ctrl-c with a stalled upload", "SIGINT to the main process", "SIGTERM to the group"],
)
def test_server_stops_every_process_within_ten_seconds(tmp_path, signum, to_group, stalled_client):
    ckpt = browsing_checkpoint(tmp_path / "best.ckpt")
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    workers = 2 if stalled_client else 1
    with serve(tmp_path, f"ckpt_path={ckpt}", f"port={port}", f"workers={workers}") as process:
        wait_for_health(process, url)
        assert len(inference_workers(process)) == workers
        stalled = start_upload_that_never_finishes(port) if stalled_client else None
        time.sleep(0.3)

        # Ctrl-C in a terminal signals the whole foreground process group.
        if to_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        elapsed, left = wait_for_group_to_end(process)
        if stalled is not None:
            stalled.close()

    assert left == []
    assert elapsed < 10
    assert process.returncode == 0
    assert "Traceback" not in process.log_path.read_text()
    with socket.socket() as client:
        assert client.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def overflowing_server(tmp_path_factory):
    """A real server of a damaged model (NaN from 110 minutes), batching up to 8 requests."""
    workdir = tmp_path_factory.mktemp("overflowing")
    ckpt = overflowing_browsing_checkpoint(workdir / "best.ckpt")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    overrides = ["max_batch_size=8", "batch_timeout=0.25"]
    with serve(workdir, f"ckpt_path={ckpt}", f"port={port}", *overrides) as process:
        wait_for_health(process, url)
        yield url, process


@pytest.mark.slow
def test_exception_inside_prediction_fails_that_request_and_the_worker_serves_on(
    overflowing_server,
):
    url, process = overflowing_server
    workers = inference_workers(process)

    failed = httpx.post(f"{url}/predict", json={"browsing_time": [30.0, 115.0]})
    after = httpx.post(f"{url}/predict", json={"browsing_time": [30.0]})

    assert failed.status_code == 500
    assert failed.json()["message"] == (
        "the model produced no finite probability for row 1; "
        "this checkpoint cannot score that session"
    )
    assert "Traceback" not in failed.text
    assert after.status_code == 200
    assert after.json()["probabilities"] == pytest.approx([browsing_purchase_probability(30.0)])
    assert inference_workers(process) == workers
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.slow
def test_one_bad_request_in_a_batch_fails_alone_and_every_other_gets_its_own_answer(
    overflowing_server,
):
    url, process = overflowing_server
    bodies = [
        {"browsing_time": [round(1.7 * number + 0.25, 2)] * (1 + number % 3)}
        for number in range(20)
    ]
    bodies[3] = {"browsing_time": [12.0, 111.0]}
    bodies[8] = {"browsing_time": [-4.0]}
    bodies[11] = {"browsing_time": [41.234567, 118.5]}
    bodies[16] = {"browsing_tim": [4.0]}
    expected_status = {3: 500, 8: 422, 11: 500, 16: 422}

    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(
            pool.map(lambda body: httpx.post(f"{url}/predict", json=body, timeout=30), bodies)
        )

    for number, (body, response) in enumerate(zip(bodies, responses)):
        assert response.status_code == expected_status.get(number, 200), response.text
        if response.status_code == 200:
            minutes = body["browsing_time"]
            expected = [browsing_purchase_probability(m) for m in minutes]
            assert response.json()["probabilities"] == pytest.approx(expected, abs=1e-6)
            assert response.json()["predictions"] == [float(m >= 20) for m in minutes]
    log = process.log_path.read_text()
    # The failing requests were scored inside a batch before being isolated.
    assert re.search(r"scoring a batch of ([2-8]) requests failed", log)
    # Request logs carry no payload contents, and a failed request no stack trace.
    assert "41.234567" not in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_dead_worker_turns_health_to_503_until_it_is_replaced(overflowing_server):
    url, process = overflowing_server
    (worker,) = inference_workers(process)

    os.kill(worker, signal.SIGKILL)
    health_while_down = httpx.get(f"{url}/health").status_code
    wait_for_health(process, url, timeout=30)
    answer = httpx.post(f"{url}/predict", json={"browsing_time": [60.0]})

    assert health_while_down == 503
    (replacement,) = inference_workers(process)
    assert replacement != worker
    assert answer.json()["predictions"] == [1.0]


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
