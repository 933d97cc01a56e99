"""Soak a real server: many concurrent clients for a set time, then requests, errors and memory.

    python scripts/soak.py --seconds 60 --connections 64
    python scripts/soak.py --checkpoint checkpoints/<run>/best.ckpt -- workers=2 max_batch_size=8

Starts scripts/serve.py on a free 127.0.0.1 port (settings after ``--`` are passed to it), waits
until it is healthy, and drives it from asyncio clients over the loopback interface only:

- most clients send random sessions and check every answer against the model loaded here;
- some send bad requests and expect their 4xx;
- some give up on purpose: they hang up right after sending, time out while waiting for the
  answer, or stop halfway through the body;
- one probes /health every second and expects 200.

After a short warm-up it records the resident memory (RSS) of all the server's processes, runs
the load for ``--seconds`` (or until ``--max-requests``), lets the server settle, and records it
again. The server is stopped through its process id. The exit status is 1 when any request went
wrong or the memory grew by more than ``--max-growth`` percent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from purchasenet.features import CATEGORICAL
from purchasenet.inference import PurchaseModel
from purchasenet.serving import resolve_checkpoint

HOST = "127.0.0.1"
SERVE = Path(__file__).resolve().parent / "serve.py"
WARM_UP_S = 5.0
SETTLE_S = 3.0
ANSWER_TIMEOUT_S = 30.0
IMPATIENT_TIMEOUT_S = 0.002
MAX_SECONDS = 600
MAX_CONNECTIONS = 256
# How often each kind of client behaviour is picked.
BEHAVIOURS = {
    "valid": 70,
    "bad": 15,
    "hang up after sending": 5,
    "time out waiting": 5,
    "stop mid-body": 5,
}


@dataclass
class Tally:
    """What the clients did and what went wrong, with one example per kind of error."""

    answered: int = 0
    rejected: int = 0
    abandoned: int = 0
    health: int = 0
    errors: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return self.answered + self.rejected + self.abandoned + self.health + self.error_count

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def error(self, kind: str, example: str) -> None:
        self.errors[kind] += 1
        self.examples.setdefault(kind, example[:300])


class Connection:
    """One keep-alive HTTP/1.1 connection to the server, with just enough of the protocol."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    def request_bytes(
        self, method: str, path: str, body: bytes, content_type: str | None, length: int
    ) -> bytes:
        head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{self.port}"]
        if content_type:
            head.append(f"Content-Type: {content_type}")
        head.append(f"Content-Length: {length}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body

    async def send(
        self,
        body: bytes = b"",
        *,
        method: str = "POST",
        path: str = "/predict",
        content_type: str | None = "application/json",
        length: int | None = None,
    ) -> None:
        await self.open()
        length = len(body) if length is None else length
        self.writer.write(self.request_bytes(method, path, body, content_type, length))
        await self.writer.drain()

    async def response(self) -> tuple[int, bytes]:
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection without answering")
        status = int(status_line.split()[1])
        headers = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            raise ConnectionError(f"answer without Content-Length: {headers}")
        body = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body


def random_sessions(model: PurchaseModel, rng: random.Random, rows: int) -> dict[str, list]:
    """Sessions in the model's columns; a few values lie beyond the training range or are
    categories never seen in training, which the server answers with warnings."""
    columns: dict[str, list] = {}
    for feature in model.encoder.features:
        spec = feature.spec
        if spec.kind == CATEGORICAL:
            values = [rng.choice(feature.categories) for _ in range(rows)]
            unseen = _unseen_category(feature.categories)
            if unseen is not None and rng.random() < 0.05:
                values[rng.randrange(rows)] = unseen
        else:
            low, high = feature.observed_min, feature.observed_max
            high_drawn = high + 0.2 * ((high - low) or 1.0)
            if spec.maximum is not None:
                high_drawn = min(high_drawn, spec.maximum)
            values = [round(rng.uniform(low, high_drawn), 4) for _ in range(rows)]
        columns[spec.name] = values
    return columns


def _unseen_category(categories: list[Any]) -> Any:
    if all(isinstance(c, str) for c in categories):
        return "never-seen-in-training"
    if all(isinstance(c, int) and not isinstance(c, bool) for c in categories):
        return max(categories) + 1000
    return None


def bad_requests(model: PurchaseModel) -> list[tuple[bytes, str | None, int]]:
    """Bodies, Content-Types and the status each must get."""
    name = model.feature_names[0]
    misspelt = json.dumps({name + "_x": [1.0]}).encode()
    duplicate = f'{{"{name}": [1.0], "{name}": [2.0]}}'.encode()
    return [
        (b'{"' + name.encode() + b'": [1.0', "application/json", 400),
        (b'{"\xff": [1.0]}', "application/json", 400),
        (duplicate, "application/json", 400),
        (misspelt, "application/json", 422),
        (b"null", "application/json", 422),
        (b"[1.0, 2.0]", "application/json", 422),
        (misspelt, "text/plain", 415),
        (misspelt, None, 415),
    ]


class Soak:
    """The clients of one soak run and what they found."""

    def __init__(self, model: PurchaseModel, port: int, seed: int, max_requests: int) -> None:
        self.model = model
        self.port = port
        self.seed = seed
        self.max_requests = max_requests
        self.bad = bad_requests(model)
        self.tally = Tally()
        self.deadline = 0.0

    def running(self) -> bool:
        return time.monotonic() < self.deadline and self.tally.requests < self.max_requests

    async def run(self, seconds: float, connections: int) -> Tally:
        self.tally = Tally()
        self.deadline = time.monotonic() + seconds
        clients = [self.client(number) for number in range(connections)]
        await asyncio.gather(*clients, self.health_probe())
        return self.tally

    async def client(self, number: int) -> None:
        rng = random.Random(self.seed * 100_003 + number)
        connection = Connection(self.port)
        behaviours, weights = zip(*BEHAVIOURS.items())
        while self.running():
            behaviour = rng.choices(behaviours, weights)[0]
            try:
                await self.act(behaviour, connection, rng)
            except asyncio.TimeoutError:
                # Caught first: it is an OSError too.
                self.tally.error(f"no answer within {ANSWER_TIMEOUT_S:g} s ({behaviour})", "")
                connection.close()
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as error:
                self.tally.error(f"connection failed ({behaviour})", repr(error))
                connection.close()
        connection.close()

    async def act(self, behaviour: str, connection: Connection, rng: random.Random) -> None:
        if behaviour == "valid":
            await self.valid_request(connection, rng)
        elif behaviour == "bad":
            await self.bad_request(connection, rng)
        else:
            await self.give_up(behaviour, connection, rng)

    async def valid_request(self, connection: Connection, rng: random.Random) -> None:
        sessions = random_sessions(self.model, rng, rng.randint(1, 20))
        await connection.send(json.dumps(sessions).encode())
        status, body = await asyncio.wait_for(connection.response(), ANSWER_TIMEOUT_S)
        if status != 200:
            self.tally.error(f"status {status} for a valid request", body.decode(errors="replace"))
            return
        expected = self.model.predict_proba(sessions)
        answered = np.asarray(json.loads(body)["probabilities"])
        if answered.shape != expected.shape or not np.allclose(answered, expected, atol=1e-5):
            self.tally.error("answer does not match its sessions", body.decode()[:200])
            return
        self.tally.answered += 1

    async def bad_request(self, connection: Connection, rng: random.Random) -> None:
        body, content_type, expected = rng.choice(self.bad)
        await connection.send(body, content_type=content_type)
        status, answer = await asyncio.wait_for(connection.response(), ANSWER_TIMEOUT_S)
        if status != expected or "message" not in json.loads(answer):
            self.tally.error(
                f"status {status} where {expected} was due", answer.decode(errors="replace")
            )
            return
        self.tally.rejected += 1

    async def give_up(self, behaviour: str, connection: Connection, rng: random.Random) -> None:
        body = json.dumps(random_sessions(self.model, rng, rng.randint(1, 20))).encode()
        if behaviour == "stop mid-body":
            await connection.send(body[: len(body) // 2], length=len(body))
        else:
            await connection.send(body)
        if behaviour == "time out waiting":
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(connection.response(), IMPATIENT_TIMEOUT_S)
        connection.close()
        self.tally.abandoned += 1

    async def health_probe(self) -> None:
        connection = Connection(self.port)
        while self.running():
            try:
                await connection.send(method="GET", path="/health", content_type=None)
                status, body = await asyncio.wait_for(connection.response(), ANSWER_TIMEOUT_S)
            except (ConnectionError, OSError, asyncio.TimeoutError) as error:
                self.tally.error("health probe failed", repr(error))
                connection.close()
            else:
                if status == 200:
                    self.tally.health += 1
                else:
                    self.tally.error(f"health answered {status}", body.decode(errors="replace"))
            await asyncio.sleep(1.0)
        connection.close()


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def resident_mib(pids: list[int]) -> float:
    """Summed resident memory of ``pids`` in MiB (pages shared after a fork count per process)."""
    total_kib = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def wait_until_healthy(process: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"error: the server exited; its log:\n{log_path.read_text()}")
        try:
            with socket.create_connection((HOST, port), timeout=2) as probe:
                probe.sendall(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                if probe.recv(100).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("error: the server did not become healthy within 120 s")


def stop_server(process: subprocess.Popen) -> list[int]:
    """SIGTERM the server (as docker stop would) and return any of its processes left after."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    deadline = time.monotonic() + 10
    while group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = group_members(process.pid)
    if left:
        os.killpg(process.pid, signal.SIGKILL)
    return left


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    overrides: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: newest best.ckpt)")
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration (max 600)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent clients (max 256)")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many")
    parser.add_argument("--max-growth", type=float, default=10.0, help="allowed memory growth, %%")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' choices")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be above 0 and at most {MAX_SECONDS}")
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        parser.error(f"--connections must be between 1 and {MAX_CONNECTIONS}")
    if args.max_requests < 1:
        parser.error("--max-requests must be at least 1")
    for override in overrides:
        if override.split("=", 1)[0] in ("host", "port", "ckpt_path"):
            parser.error(f"{override}: the soak chooses host, port and checkpoint itself")
    return args, overrides


def report(args, overrides, port, tally, seconds, memory) -> None:
    cold, before, after, peak, processes_before, processes_after = memory
    growth = 100.0 * (after - before) / before
    settings = " ".join(overrides) or "defaults"
    print(f"Soak of {HOST}:{port} ({settings}): {seconds:.0f} s, {args.connections} connections")
    print(f"  requests      {tally.requests:>9,}  ({tally.requests / seconds:,.0f} per second)")
    print(f"    answered    {tally.answered:>9,}  valid sessions, each answer checked")
    print(f"    rejected    {tally.rejected:>9,}  bad requests answered with their 4xx")
    print(f"    abandoned   {tally.abandoned:>9,}  clients that hung up, timed out or stopped")
    print(f"    health      {tally.health:>9,}  /health probes answered 200")
    print(f"  errors        {tally.error_count:>9,}")
    for kind, count in tally.errors.most_common():
        print(f"    {count:>6,}  {kind}: {tally.examples[kind]}")
    print(
        f"  server RSS    {before:,.1f} MiB before, {after:,.1f} MiB after ({growth:+.1f} %), "
        f"peak {peak:,.1f} MiB; {cold:,.1f} MiB before the warm-up"
    )
    print(f"  processes     {processes_before} before, {processes_after} after")


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    checkpoint = resolve_checkpoint(args.checkpoint)
    model = PurchaseModel.from_checkpoint(checkpoint)
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="purchasenet-soak-"))
    log_path = workdir / "serve.log"
    command = [
        sys.executable,
        str(SERVE),
        f"ckpt_path={checkpoint.resolve()}",
        f"port={port}",
        f"host={HOST}",
        "log_level=warning",
        *overrides,
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_healthy(process, port, log_path)
        cold = resident_mib(group_members(process.pid))
        soak = Soak(model, port, args.seed, args.max_requests)
        asyncio.run(soak.run(WARM_UP_S, args.connections))
        members_before = group_members(process.pid)
        before = resident_mib(members_before)

        peak = before
        began = time.monotonic()

        async def load_and_watch() -> Tally:
            nonlocal peak
            load = asyncio.ensure_future(soak.run(args.seconds, args.connections))
            while not load.done():
                peak = max(peak, resident_mib(group_members(process.pid)))
                await asyncio.sleep(1.0)
            return load.result()

        tally = asyncio.run(load_and_watch())
        seconds = time.monotonic() - began
        time.sleep(SETTLE_S)
        members_after = group_members(process.pid)
        after = resident_mib(members_after)
    finally:
        left = stop_server(process)

    memory = (cold, before, after, peak, len(members_before), len(members_after))
    report(args, overrides, port, tally, seconds, memory)
    print(f"  server log    {log_path}")
    if left:
        print(f"  server processes left after SIGTERM (killed): {left}")
    growth = 100.0 * (after - before) / before
    return 1 if tally.error_count or growth > args.max_growth or left else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
