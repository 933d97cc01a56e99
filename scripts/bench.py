"""Benchmark training and serving against plain baselines measured in the same run.

    python scripts/bench.py                  # full run, a few minutes on 2 cores
    python scripts/bench.py --quick          # one repeat, short load phases
    python scripts/bench.py --output bench.json

Contenders alternate within each repeat, so a slow moment of the machine hits both. Every
figure is a median over the repeats, and every goal is a ratio of ours to the baseline:

    P1  whole process of scripts/train.py (default config)  vs benchmarks/plain_train.py
    P2  fit time of the seed recipe                          vs the plain loop's fit time
    P3  4-value requests at 32 connections: req/s and p99    vs benchmarks/plain_server.py
    P4  1,000-row requests at 8 connections: rows/s          vs the same plain server
    P5  cold start (launch to /health 200) and resident memory of all server processes

Load comes from wrk when it is installed (Debian package ``wrk``), else from a bounded Python
client; all traffic stays on 127.0.0.1 and every answer is compared with the expected body.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SEED_RECIPE = ["experiment=seed_recipe"]
SMALL_REQUEST = {"browsing_time": [5.0, 15.0, 30.0, 60.0]}
WRK_SCRIPT = """
local threads = {}
local function slurp(path)
  local file = assert(io.open(path, "rb"))
  local text = file:read("*a")
  file:close()
  return text
end
local expected = slurp(os.getenv("BENCH_EXPECTED_FILE"))
wrk.method = "POST"
wrk.body = slurp(os.getenv("BENCH_BODY_FILE"))
wrk.headers["Content-Type"] = "application/json"
function setup(thread) table.insert(threads, thread) end
function init(args) wrong = 0 end
function response(status, headers, body)
  if status ~= 200 or body ~= expected then wrong = wrong + 1 end
end
function done(summary, latency, requests)
  local wrong_total = 0
  for _, thread in ipairs(threads) do wrong_total = wrong_total + thread:get("wrong") end
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %f %f %f\\n", summary.requests, wrong_total,
    e.connect + e.read + e.write + e.status + e.timeout, latency:percentile(50),
    latency:percentile(99), summary.duration))
end
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timed_run(command: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return elapsed, result.stdout


def train_command(run_name: str, *overrides: str) -> list[str]:
    return [
        PYTHON, str(ROOT / "scripts" / "train.py"), f"run_name={run_name}",
        "trainer.enable_progress_bar=false", *overrides,
    ]


def plain_command(*arguments: str) -> list[str]:
    return [PYTHON, str(ROOT / "benchmarks" / "plain_train.py"), *arguments]


def our_run_metrics(workdir: Path, run_name: str) -> dict[str, float]:
    import torch

    checkpoint = torch.load(
        workdir / "checkpoints" / run_name / "best.ckpt", map_location="cpu", weights_only=True
    )
    metrics = dict(checkpoint["purchasenet"]["test_metrics"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "logs" / run_name))
    events.Reload()
    metrics["fit_seconds"] = events.Scalars("time/fit_seconds")[-1].value
    return metrics


def bench_training(workdir: Path, repeats: int, log: Callable[[str], None]) -> dict:
    whole_ours, whole_plain, acc_ours, acc_plain = [], [], [], []
    fit_ours, fit_plain, seed_acc_ours, seed_acc_plain = [], [], [], []
    for repeat in range(repeats):
        name = f"p1-{repeat}"
        seconds, _ = timed_run(train_command(name), workdir)
        whole_ours.append(seconds)
        acc_ours.append(our_run_metrics(workdir, name)["test/acc"])
        seconds, output = timed_run(plain_command(), workdir)
        whole_plain.append(seconds)
        acc_plain.append(json.loads(output.strip().splitlines()[-1])["test_acc"])
        log(f"  P1 repeat {repeat + 1}: ours {whole_ours[-1]:.2f} s, plain {seconds:.2f} s")

        name = f"p2-{repeat}"
        timed_run(train_command(name, *SEED_RECIPE), workdir)
        metrics = our_run_metrics(workdir, name)
        fit_ours.append(metrics["fit_seconds"])
        seed_acc_ours.append(metrics["test/acc"])
        _, output = timed_run(
            plain_command("--hidden", "5", "--epochs", "200", "--no-scale"), workdir
        )
        plain = json.loads(output.strip().splitlines()[-1])
        fit_plain.append(plain["fit_seconds"])
        seed_acc_plain.append(plain["test_acc"])
        log(f"  P2 repeat {repeat + 1}: ours {fit_ours[-1]:.2f} s, plain {fit_plain[-1]:.2f} s")
    return {
        "P1": {
            "ours_seconds": median(whole_ours), "plain_seconds": median(whole_plain),
            "ratio": median(whole_ours) / median(whole_plain),
            "ours_test_acc": median(acc_ours), "plain_test_acc": median(acc_plain),
        },
        "P2": {
            "ours_fit_seconds": median(fit_ours), "plain_fit_seconds": median(fit_plain),
            "ratio": median(fit_ours) / median(fit_plain),
            "ours_test_acc": median(seed_acc_ours), "plain_test_acc": median(seed_acc_plain),
        },
    }


def bench_training_scale(workdir: Path, sizes: Sequence[int], log) -> list[dict]:
    rows = []
    for size in sizes:
        name = f"scale-{size}"
        timed_run(
            train_command(name, f"data.dataset.n_train={size}", "trainer.max_epochs=1",
                          "test=false"),
            workdir,
        )
        ours = our_run_metrics_fit_only(workdir, name)
        _, output = timed_run(plain_command("--n-train", str(size), "--epochs", "1"), workdir)
        plain = json.loads(output.strip().splitlines()[-1])["fit_seconds"]
        rows.append({"rows": size, "ours_epoch_seconds": ours, "plain_epoch_seconds": plain,
                     "ratio": ours / plain})
        log(f"  1 epoch of {size:,} rows: ours {ours:.2f} s, plain {plain:.2f} s")
    return rows


def our_run_metrics_fit_only(workdir: Path, run_name: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "logs" / run_name))
    events.Reload()
    return events.Scalars("time/fit_seconds")[-1].value


def group_memory_mb(pgid: int) -> dict[str, float]:
    """Memory of every process in a process group, in MB: summed RSS and summed PSS.

    RSS counts a page shared by forked processes once per process; PSS splits it among them,
    so the PSS sum is what the server holds in memory.
    """
    totals = {"rss_mb": 0.0, "pss_mb": 0.0}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[2]) != pgid:
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    totals["rss_mb"] += int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    totals["pss_mb"] += int(line.split()[1]) / 1024
        except (OSError, IndexError, ValueError):
            continue
    return totals


@contextmanager
def server_process(command: list[str], cwd: Path, port: int):
    """Start a server in its own process group; yield (process, seconds until /health 200)."""
    log_file = open(cwd / f"server-{port}.log", "w")
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = started + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {(cwd / f'server-{port}.log').read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError("server did not become healthy within 120 s")
            time.sleep(0.02)
        yield process, time.perf_counter() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log_file.close()


def our_server(checkpoint: Path, port: int) -> list[str]:
    return [PYTHON, str(ROOT / "scripts" / "serve.py"), f"ckpt_path={checkpoint}", f"port={port}",
            "log_level=warning"]


def plain_server(checkpoint: Path, port: int) -> list[str]:
    return [PYTHON, str(ROOT / "benchmarks" / "plain_server.py"), str(checkpoint),
            "--port", str(port)]


def load_with_wrk(url: str, body: str, expected: str, connections: int, seconds: float,
                  workdir: Path) -> dict:
    script = workdir / "bench.lua"
    script.write_text(WRK_SCRIPT)
    (workdir / "body.json").write_text(body)
    (workdir / "expected.json").write_text(expected)
    threads = max(1, min(2, connections))
    result = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
         "--timeout", "10s", "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 60,
        env={**os.environ, "BENCH_BODY_FILE": str(workdir / "body.json"),
             "BENCH_EXPECTED_FILE": str(workdir / "expected.json")},
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH ")]
    if not lines:
        raise RuntimeError(f"wrk gave no figures:\n{result.stdout}\n{result.stderr}")
    line = lines[0]
    requests, wrong, errors, p50_us, p99_us, duration_us = (float(v) for v in line.split()[1:])
    return {"requests": int(requests), "wrong": int(wrong), "errors": int(errors),
            "rps": requests / (duration_us / 1e6), "p50_ms": p50_us / 1000,
            "p99_ms": p99_us / 1000}


def load_with_python(url: str, body: str, expected: str, connections: int,
                     seconds: float) -> dict:
    expected_json = json.loads(expected)

    async def client(http: httpx.AsyncClient, stop: float, latencies: list, failures: list):
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                response = await http.post(url, content=body,
                                           headers={"Content-Type": "application/json"})
                if response.status_code != 200 or response.json() != expected_json:
                    failures.append("wrong")
            except httpx.HTTPError:
                failures.append("error")
            latencies.append(time.perf_counter() - started)

    async def drive() -> tuple[list, list, float]:
        latencies, failures = [], []
        limits = httpx.Limits(max_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=10) as http:
            started = time.perf_counter()
            stop = started + seconds
            await asyncio.gather(*(client(http, stop, latencies, failures)
                                   for _ in range(connections)))
            return latencies, failures, time.perf_counter() - started

    latencies, failures, elapsed = asyncio.run(drive())
    latencies.sort()
    return {"requests": len(latencies), "wrong": failures.count("wrong"),
            "errors": failures.count("error"), "rps": len(latencies) / elapsed,
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


def drive_load(port: int, payload: dict, connections: int, seconds: float, workdir: Path) -> dict:
    url = f"http://127.0.0.1:{port}/predict"
    body = json.dumps(payload)
    expected = httpx.post(url, content=body, headers={"Content-Type": "application/json"},
                          timeout=30).text
    if shutil.which("wrk"):
        return load_with_wrk(url, body, expected, connections, seconds, workdir)
    return load_with_python(url, body, expected, connections, seconds)


def answers_agree(port_a: int, port_b: int, payload: dict) -> bool:
    answers = [httpx.post(f"http://127.0.0.1:{port}/predict", json=payload, timeout=30).json()
               for port in (port_a, port_b)]
    return (answers[0]["predictions"] == answers[1]["predictions"]
            and all(abs(a - b) < 1e-6 for a, b in zip(answers[0]["probabilities"],
                                                        answers[1]["probabilities"])))


def bench_serving(workdir: Path, checkpoint: Path, repeats: int, seconds: float, log) -> dict:
    big_request = {"browsing_time": [float(0.5 + (i % 240) / 2) for i in range(1000)]}
    servers = {"ours": our_server, "plain": plain_server}
    results = {name: {"P3": [], "P4": [], "cold_start": [], "rss_mb": [], "pss_mb": []}
               for name in servers}
    for repeat in range(repeats):
        ports = {}
        for name, command in servers.items():
            port = free_port()
            with server_process(command(checkpoint, port), workdir, port) as (process, cold):
                httpx.post(f"http://127.0.0.1:{port}/predict", json=SMALL_REQUEST, timeout=30)
                results[name]["cold_start"].append(cold)
                for key, value in group_memory_mb(process.pid).items():
                    results[name][key].append(value)
                results[name]["P3"].append(drive_load(port, SMALL_REQUEST, 32, seconds, workdir))
                results[name]["P4"].append(drive_load(port, big_request, 8, seconds, workdir))
                ports[name] = port
            p3 = results[name]["P3"][-1]
            log(f"  {name:>5} repeat {repeat + 1}: cold start {cold:.2f} s, "
                f"{p3['rps']:.0f} req/s, p99 {p3['p99_ms']:.1f} ms, "
                f"{results[name]['P4'][-1]['rps'] * 1000:.0f} rows/s")

    def summary(name: str, phase: str, key: str) -> float:
        return median([run[key] for run in results[name][phase]])

    def failures(name: str) -> int:
        return sum(run["wrong"] + run["errors"] for phase in ("P3", "P4")
                   for run in results[name][phase])

    return {
        "P3": {
            "ours_rps": summary("ours", "P3", "rps"), "plain_rps": summary("plain", "P3", "rps"),
            "ours_p99_ms": summary("ours", "P3", "p99_ms"),
            "plain_p99_ms": summary("plain", "P3", "p99_ms"),
            "ours_p50_ms": summary("ours", "P3", "p50_ms"),
            "plain_p50_ms": summary("plain", "P3", "p50_ms"),
        },
        "P4": {
            "ours_rows_per_s": summary("ours", "P4", "rps") * 1000,
            "plain_rows_per_s": summary("plain", "P4", "rps") * 1000,
        },
        "P5": {
            "ours_cold_start_s": median(results["ours"]["cold_start"]),
            "plain_cold_start_s": median(results["plain"]["cold_start"]),
            "ours_rss_mb": median(results["ours"]["rss_mb"]),
            "plain_rss_mb": median(results["plain"]["rss_mb"]),
            "ours_pss_mb": median(results["ours"]["pss_mb"]),
            "plain_pss_mb": median(results["plain"]["pss_mb"]),
        },
        "failed_answers": {"ours": failures("ours"), "plain": failures("plain")},
    }


def bench_serving_scale(workdir: Path, checkpoint: Path, sizes: Sequence[int], seconds: float,
                        log) -> list[dict]:
    rows = []
    ports = {"ours": free_port(), "plain": free_port()}
    with server_process(our_server(checkpoint, ports["ours"]), workdir, ports["ours"]), \
            server_process(plain_server(checkpoint, ports["plain"]), workdir, ports["plain"]):
        for size in sizes:
            payload = {"browsing_time": [float(0.5 + (i % 240) / 2) for i in range(size)]}
            if not answers_agree(ports["ours"], ports["plain"], payload):
                raise RuntimeError(f"the two servers disagree on a {size}-row request")
            row = {"rows_per_request": size}
            for name, port in ports.items():
                load = drive_load(port, payload, 4, seconds, workdir)
                row[f"{name}_rows_per_s"] = load["rps"] * size
                row[f"{name}_p50_ms"] = load["p50_ms"]
            rows.append(row)
            log(f"  {size:>6} rows/request: ours {row['ours_rows_per_s']:,.0f} rows/s, "
                f"plain {row['plain_rows_per_s']:,.0f} rows/s")
    return rows


def print_table(results: dict) -> None:
    p1, p2, p3, p4, p5 = (results[key] for key in ("P1", "P2", "P3", "P4", "P5"))
    goals = [
        ("P1 train.py whole process (s)", p1["ours_seconds"], p1["plain_seconds"],
         p1["ratio"], "<= 1.0x", p1["ratio"] <= 1.0),
        ("P2 seed-recipe fit (s)", p2["ours_fit_seconds"], p2["plain_fit_seconds"],
         p2["ratio"], "<= 1.5x", p2["ratio"] <= 1.5),
        ("P3 4-value requests, c=32 (req/s)", p3["ours_rps"], p3["plain_rps"],
         p3["ours_rps"] / p3["plain_rps"], ">= 2x", p3["ours_rps"] >= 2 * p3["plain_rps"]),
        ("P3 p99 latency (ms)", p3["ours_p99_ms"], p3["plain_p99_ms"],
         p3["ours_p99_ms"] / p3["plain_p99_ms"], "<= 0.5x",
         p3["ours_p99_ms"] <= 0.5 * p3["plain_p99_ms"]),
        ("P4 1,000-row requests, c=8 (rows/s)", p4["ours_rows_per_s"], p4["plain_rows_per_s"],
         p4["ours_rows_per_s"] / p4["plain_rows_per_s"], ">= 3x",
         p4["ours_rows_per_s"] >= 3 * p4["plain_rows_per_s"]),
        ("P5 cold start (s)", p5["ours_cold_start_s"], p5["plain_cold_start_s"],
         p5["ours_cold_start_s"] / p5["plain_cold_start_s"], "<= 3 s",
         p5["ours_cold_start_s"] <= 3),
        ("P5 memory, PSS of all processes (MB)", p5["ours_pss_mb"], p5["plain_pss_mb"],
         p5["ours_pss_mb"] / p5["plain_pss_mb"], "<= 400 MB", p5["ours_pss_mb"] <= 400),
        ("P5 memory, RSS summed (MB)", p5["ours_rss_mb"], p5["plain_rss_mb"],
         p5["ours_rss_mb"] / p5["plain_rss_mb"], "<= 400 MB", p5["ours_rss_mb"] <= 400),
    ]
    print("\n| measure | ours | baseline | ratio | goal | met |\n|---|---:|---:|---:|---|---|")
    for label, ours, base, ratio, goal, met in goals:
        print(f"| {label} | {ours:,.2f} | {base:,.2f} | {ratio:.2f}x | {goal} | "
              f"{'yes' if met else 'no'} |")
    print(f"\nTest accuracy: default config ours {p1['ours_test_acc']:.4f}, plain "
          f"{p1['plain_test_acc']:.4f}; seed recipe ours {p2['ours_test_acc']:.4f}, plain "
          f"{p2['plain_test_acc']:.4f}")
    print(f"Wrong or failed answers under load: {results['failed_answers']}")
    print("\n| training rows | ours, 1 epoch (s) | plain, 1 epoch (s) | ratio |")
    print("|---:|---:|---:|---:|")
    for row in results["training_scale"]:
        print(f"| {row['rows']:,} | {row['ours_epoch_seconds']:.2f} | "
              f"{row['plain_epoch_seconds']:.2f} | {row['ratio']:.2f}x |")
    print("\n| rows per request | ours rows/s | plain rows/s | ours p50 (ms) | plain p50 (ms) |"
          "\n|---:|---:|---:|---:|---:|")
    for row in results["serving_scale"]:
        print(f"| {row['rows_per_request']:,} | {row['ours_rows_per_s']:,.0f} | "
              f"{row['plain_rows_per_s']:,.0f} | {row['ours_p50_ms']:.1f} | "
              f"{row['plain_p50_ms']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each load phase")
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, 3-second load phases, training scale up to 80,000 rows")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the figures")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.seconds = 1, 3.0
    training_sizes = [800, 80_000] if args.quick else [800, 80_000, 800_000]
    output = args.output or ROOT / "logs" / "bench" / f"{datetime.now():%Y%m%d-%H%M%S}.json"

    def log(message: str) -> None:
        print(message, flush=True)

    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_generator": "wrk" if shutil.which("wrk") else "python"},
        "repeats": args.repeats,
    }
    with tempfile.TemporaryDirectory(prefix="purchasenet-bench-") as folder:
        workdir = Path(folder)
        log(f"Benchmarking in {workdir} ({results['machine']['load_generator']} load)")
        log("Training (P1, P2):")
        results.update(bench_training(workdir, args.repeats, log))
        log("Training cost by rows:")
        results["training_scale"] = bench_training_scale(workdir, training_sizes, log)
        checkpoint = workdir / "checkpoints" / "p1-0" / "best.ckpt"
        log("Serving (P3, P4, P5):")
        results.update(bench_serving(workdir, checkpoint, args.repeats, args.seconds, log))
        log("Serving cost by rows per request:")
        results["serving_scale"] = bench_serving_scale(
            workdir, checkpoint, [1, 10, 100, 1000, 10_000], max(2.0, args.seconds / 2), log
        )
    print_table(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"\nFigures written to {output}")


if __name__ == "__main__":
    main()
