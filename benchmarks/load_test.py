"""Load test of ``hf-tome serve`` on loopback: requests/s and p50/p99 latency, batching on and off.

Starts the real server in a subprocess on 127.0.0.1 (its own process group, ended afterwards), then runs
phases of ``--clients`` concurrent clients, each bounded by a request count and a time limit:

- batching off (max_batch_size 1), budget ``full`` (no merging)
- batching on, budget ``full``
- batching on, budget ``half`` (the constant r with at most half the MACs)

    python benchmarks/load_test.py                           # embedded default model, 64 clients
    python benchmarks/load_test.py --requests 128 --clients 16 --model path/to/model
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_payloads(count: int = 32) -> list[dict]:
    """Fashion-MNIST test images as JSON bodies (base64 PNG)."""
    from hf_tome.evaluation.assets.fashion_mnist import load_fashion_mnist

    payloads = []
    for image in load_fashion_mnist("test", limit=count)["image"]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        payloads.append({"image": base64.b64encode(buffer.getvalue()).decode()})
    return payloads


class ServerProcess:
    """``python -m hf_tome_server ...`` on a free loopback port, stopped with its whole process group."""

    def __init__(self, model: str | None, max_batch_size: int, dtype: str, log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "hf_tome_server", "--port", str(self.port),
                   "--max-batch-size", str(max_batch_size),
                   "--batch-timeout", "0.05", "--dtype", dtype, "--budget", "full=r:0", "--budget", "half=macs:0.5"]
        if model:
            command += ["--model", model]
        self.log = open(log_path, "w")  # noqa: SIM115
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_healthy(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


def run_phase(url: str, payloads: list[dict], budget: str, clients: int, total_requests: int,
              max_seconds: float, description: str) -> dict:
    """``clients`` threads send requests until ``total_requests`` are done or ``max_seconds`` pass."""
    latencies: list[float] = []
    failures = 0
    issued = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds
    progress = tqdm(total=total_requests, desc=description, unit="req")

    def client(index: int) -> None:
        nonlocal issued, failures
        session = requests.Session()
        while True:
            with lock:
                if issued >= total_requests or time.perf_counter() > deadline:
                    return
                issued += 1
                payload = payloads[issued % len(payloads)] | {"budget": budget}
            start = time.perf_counter()
            ok = session.post(f"{url}/predict", json=payload, timeout=max_seconds).status_code == 200
            elapsed = time.perf_counter() - start
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    failures += 1
            progress.update(1)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    progress.close()
    ordered = sorted(latencies)
    return {"requests": len(latencies), "failures": failures, "seconds": wall,
            "requests_per_s": len(latencies) / wall,
            "p50_ms": 1000 * statistics.median(ordered) if ordered else None,
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=384, help="requests per phase (upper bound)")
    parser.add_argument("--max-seconds", type=float, default=180, help="time limit per phase")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path("results/load_test.json"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payloads = request_payloads()
    phases = [("batching off, full", 1, "full"), ("batching on, full", args.max_batch_size, "full"),
              ("batching on, half MACs", args.max_batch_size, "half")]
    results: dict[str, dict] = {}
    servers: dict[int, ServerProcess] = {}
    try:
        for name, batch_size, budget in phases:
            if batch_size not in servers:
                for running in servers.values():  # one server at a time: they would share the 2 cores
                    running.stop()
                servers = {batch_size: ServerProcess(args.model, batch_size, args.dtype,
                                                     args.out.with_suffix(f".server{batch_size}.log"))}
                servers[batch_size].wait_healthy()
            url = servers[batch_size].url
            run_phase(url, payloads, budget, min(args.clients, 8), 16, args.max_seconds, f"warm-up {name}")
            results[name] = run_phase(url, payloads, budget, args.clients, args.requests, args.max_seconds, name)
            results[name]["metrics"] = requests.get(f"{url}/metrics", timeout=10).json()
    finally:
        for running in servers.values():
            running.stop()
    off, on, half = (results[name]["requests_per_s"] for name, _, _ in phases)
    summary = {"batching_speedup": on / off, "half_macs_speedup": half / on}
    print(f"\n{args.clients} concurrent clients on 127.0.0.1, dtype {args.dtype}")
    print("| phase | requests | req/s | p50 ms | p99 ms | mean batch |\n|---|---|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['requests']} | {row['requests_per_s']:.2f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} "
              f"| {row['metrics']['mean_batch_size'] or 0:.1f} |")
    print(f"\nbatching on / off: {summary['batching_speedup']:.2f}x; half MACs / full (batching on): "
          f"{summary['half_macs_speedup']:.2f}x")
    args.out.write_text(json.dumps({"clients": args.clients, "phases": results, "summary": summary}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
