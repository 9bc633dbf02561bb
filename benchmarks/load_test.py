"""Load test of ``hf-tome serve`` on loopback, per budget: requests/s, images/s, p50/p99, against the bare forward.

Starts the real server in a subprocess on 127.0.0.1 (its own process group, ended afterwards) on ``--device``
(auto: CUDA when torch sees a GPU) and runs phases of ``--clients`` concurrent clients, each bounded by a request
count and a time limit:

- batching off (max_batch_size 1), the first budget (``--no-batching-off`` skips it)
- batching on (``--max-batch-size``), each budget in turn (default ``full=r:0`` and ``half=macs:0.5``); with
  ``--rounds N`` the budgets alternate N times (full, half, full, half...) and each budget's rounds are pooled

Each request is one image, so images/s = requests/s. The same budgets' bare forward images/s at the batch size the
server ran (benchmarks/batch_efficiency.py, with the same device, dtype and threads, timed before the server phases
and again after them: the mean of both) give the server's share of the bare forward. The bare forward runs in one
process with ``--threads`` threads and, with ``--workers W``, also as W processes of ``--threads / W`` threads at
once (the server's arrangement); the one that serves more is the reference. The acceptance targets are
``server >= 90%`` of the bare forward for every budget and the half-MACs budget at ``>= 1.8x`` the full one's
requests/s. Everything is written to ``--out`` (JSON).

    python benchmarks/load_test.py                           # embedded default model, 64 clients
    python benchmarks/load_test.py --requests 128 --clients 16 --model path/to/model
    python benchmarks/load_test.py --threads 2 --workers 2 --dtype auto --requests 480 --rounds 3   # the README's
    python benchmarks/load_test.py --device cuda --dtype bfloat16 --max-batch-size 64
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
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
    from hf_tome.evaluation.assets.fashion_mnist import fashion_mnist_pngs

    return [{"image": base64.b64encode(png).decode()} for png in fashion_mnist_pngs("test", limit=count)[0]]


class ServerProcess:
    """``python -m hf_tome_server ...`` on a free loopback port, stopped with its whole process group."""

    def __init__(self, model: str | None, max_batch_size: int, log_path: Path, options: list[str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "hf_tome_server", "--port", str(self.port),
                   "--max-batch-size", str(max_batch_size), "--batch-timeout", "0.05", *options]
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


class _Connection:
    """One keep-alive HTTP/1.1 connection on a plain socket. The clients share the server's cores, so the load
    generator should cost as little CPU per request as it can: each request's bytes are built once per phase, and a
    response is read by its ``content-length`` (``http.client`` cost about 0.3 ms of CPU per request, a ``requests``
    session several times more)."""

    def __init__(self, url: str, timeout: float) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.address, self.timeout = (host, int(port)), timeout
        self.sock: socket.socket | None = None
        self.pending = b""  # bytes read past the previous response

    def post(self, request: bytes) -> str:
        """Send a whole request; the status code as text, or why there is none (the connection is then reopened)."""
        try:
            if self.sock is None:
                self.sock = socket.create_connection(self.address, timeout=self.timeout)
                self.pending = b""
            self.sock.sendall(request)
            status, keep_open = self._response()
            if not keep_open:
                self.close()
            return status
        except (OSError, ValueError) as error:
            self.close()
            return type(error).__name__

    def _response(self) -> tuple[str, bool]:
        data = self.pending
        while b"\r\n\r\n" not in data:
            data += self._receive()
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = (line.partition(":") for line in lines[1:])
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        if "content-length" not in headers:
            raise ValueError(f"no content-length in {lines[0]!r}")
        length = int(headers["content-length"])
        while len(data) < length:
            data += self._receive()
        self.pending = data[length:]
        return lines[0].split(" ", 2)[1], headers.get("connection", "").lower() != "close"

    def _receive(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        return chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def run_phase(url: str, payloads: list[dict], budget: str, clients: int, total_requests: int,
              max_seconds: float, description: str) -> dict:
    """``clients`` threads send requests until ``total_requests`` are done or ``max_seconds`` pass."""
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    issued = 0
    lock = threading.Lock()
    host = url.removeprefix("http://")
    bodies = [json.dumps(payload | {"budget": budget}).encode() for payload in payloads]  # encoded once, not per send
    bodies = [f"POST /predict HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: "
              f"{len(body)}\r\n\r\n".encode() + body for body in bodies]
    deadline = time.perf_counter() + max_seconds
    progress = tqdm(total=total_requests, desc=description, unit="req")

    def client(index: int) -> None:
        nonlocal issued
        connection = _Connection(url, max_seconds)
        while True:
            with lock:
                if issued >= total_requests or time.perf_counter() > deadline:
                    connection.close()
                    return
                issued += 1
                body = bodies[issued % len(bodies)]
            start = time.perf_counter()
            status = connection.post(body)
            elapsed = time.perf_counter() - start
            with lock:
                if status == "200":
                    latencies.append(elapsed)
                else:
                    failures[status] += 1
            progress.update(1)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    progress.close()
    return {"requests": len(latencies), "failures": dict(failures), "seconds": wall,
            "requests_per_s": len(latencies) / wall, **_quantiles(latencies), "latencies": latencies}


def _quantiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"p50_ms": 1000 * statistics.median(ordered) if ordered else None,
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None}


def pooled(rows: list[dict], name: str) -> dict:
    """One budget's rounds as one phase: all its requests over all its seconds, quantiles of all latencies."""
    requests_done, seconds = sum(row["requests"] for row in rows), sum(row["seconds"] for row in rows)
    batches = [(row["mean_batch_size"], row["requests"]) for row in rows if row["mean_batch_size"]]
    failures: Counter[str] = Counter()
    for row in rows:
        failures.update(row["failures"])
    return {"requests": requests_done, "failures": dict(failures), "seconds": seconds,
            "requests_per_s": requests_done / seconds, "images_per_s": requests_done / seconds,
            **_quantiles([latency for row in rows for latency in row["latencies"]]), "budget": name,
            "max_batch_size": rows[0]["max_batch_size"], "rounds": len(rows),
            "requests_per_s_per_round": [row["requests_per_s"] for row in rows],
            "mean_batch_size": sum(size * count for size, count in batches) / sum(count for _, count in batches)
            if batches else None}


def bare_forward(args: argparse.Namespace, budgets: list[str], out: Path, processes: int = 1) -> dict[str, float]:
    """Bare forward images/s of each budget at ``--max-batch-size`` (batch_efficiency.py): ``processes`` of them at
    once, each with ``--threads / processes`` torch threads, their images/s summed (the same work in each, started
    together, so that they overlap)."""
    command = [sys.executable, str(ROOT / "benchmarks/batch_efficiency.py"), "--batch-sizes",
               str(args.max_batch_size), "--dtypes", args.dtype, "--device", args.device,
               "--images", str(args.bare_images)]
    command += [f"--budget={spec}" for spec in budgets]
    command += ["--model", args.model] if args.model else []
    command += ["--threads", str(args.threads // processes)] if args.threads else []
    command += [] if args.keep_freed_memory else ["--no-keep-freed-memory"]
    outs = [out if processes == 1 else out.with_suffix(f".process{k}.json") for k in range(processes)]
    running = [subprocess.Popen([*command, "--out", str(path)], cwd=ROOT) for path in outs]
    if any(process.wait() != 0 for process in running):
        raise RuntimeError(f"the bare forward failed: {' '.join(command)}")
    totals: dict[str, float] = {}
    for path in outs:
        for row in json.loads(path.read_text())["rows"]:
            totals[row["budget"]] = totals.get(row["budget"], 0.0) + row["images_per_s"][str(args.max_batch_size)]
    return totals


def bare_arrangements(args: argparse.Namespace, budgets: list[str], out: Path) -> dict[str, dict[str, float]]:
    """The bare forward in one process with ``--threads`` threads and, with ``--workers W``, also in W processes of
    ``--threads / W`` threads at once, as the server's workers run (whichever serves more is the reference)."""
    arrangements = {"one_process": bare_forward(args, budgets, out)}
    if args.workers > 1:
        arrangements[f"{args.workers}_processes"] = bare_forward(args, budgets, out.with_suffix(".workers.json"),
                                                                 processes=args.workers)
    return arrangements


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=384, help="requests per phase (upper bound)")
    parser.add_argument("--max-seconds", type=float, default=180, help="time limit per phase")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--budget", dest="budgets", action="append", default=None,
                        help="name=spec, repeatable (default: full=r:0 half=macs:0.5); the first is the reference")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the bare forward, and of the server's workers together")
    parser.add_argument("--workers", type=int, default=1,
                        help="the server's inference worker processes; each runs --threads / --workers torch threads "
                             "(the bare forward runs --threads in one process)")
    parser.add_argument("--compile", action="store_true", help="serve with torch.compile (slow to start)")
    parser.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                        help="the server and the bare forward leave glibc malloc's thresholds alone")
    parser.add_argument("--serve-arg", dest="serve_args", action="append", default=[],
                        help="an option handed to the server as is, repeatable (--serve-arg=--queues=litserve)")
    parser.add_argument("--no-batching-off", dest="batching_off", action="store_false",
                        help="skip the max_batch_size 1 phase")
    parser.add_argument("--no-bare", dest="bare", action="store_false", help="skip the bare forward comparison")
    parser.add_argument("--bare-images", type=int, default=320, help="images timed by the bare forward per budget")
    parser.add_argument("--rounds", type=int, default=1,
                        help="batched phases per budget, alternating budgets (full, half, full, half...), pooled: "
                             "the machine's drift during a run then weighs on every budget alike")
    parser.add_argument("--warm-up", type=int, default=64,
                        help="requests sent before each phase's timing, by --clients clients (full batches: a "
                             "worker's first forwards of a batch shape also fault in its memory)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/load_test.json")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    budgets = args.budgets or ["full=r:0", "half=macs:0.5"]
    names = [spec.partition("=")[0] for spec in budgets]
    options = ["--device", args.device, "--dtype", args.dtype, *[f"--budget={spec}" for spec in budgets]]
    if args.workers < 1 or (args.threads and args.threads % args.workers):
        parser.error(f"--workers={args.workers} is invalid: expected an integer >= 1 that divides --threads")
    options += ["--workers", str(args.workers)]
    options += ["--threads", str(args.threads // args.workers)] if args.threads else []
    options += ["--compile"] if args.compile else []
    options += [] if args.keep_freed_memory else ["--no-keep-freed-memory"]
    options += args.serve_args
    # The bare forward is timed before the server phases and again after them: on a shared (virtual) machine its
    # images/s drifts by +-10% within minutes, so the share uses the mean of the two and both are kept.
    bare_runs = [bare_arrangements(args, budgets, args.out.with_suffix(".bare.json"))] if args.bare else []
    payloads = request_payloads()
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds} is invalid: expected an integer >= 1")
    phases = [(f"batching on, {name}" + (f", round {k + 1}" if args.rounds > 1 else ""), args.max_batch_size, name)
              for k in range(args.rounds) for name in names]
    if args.batching_off:
        phases.insert(0, (f"batching off, {names[0]}", 1, names[0]))
    results: dict[str, dict] = {}
    servers: dict[int, ServerProcess] = {}
    info: dict = {}
    try:
        for phase, batch_size, budget in phases:
            if batch_size not in servers:
                for running in servers.values():  # one server at a time: they would share the cores
                    running.stop()
                servers = {batch_size: ServerProcess(args.model, batch_size,
                                                     args.out.with_suffix(f".server{batch_size}.log"), options)}
                servers[batch_size].wait_healthy()
                info = requests.get(f"{servers[batch_size].url}/info", timeout=10).json()
            url = servers[batch_size].url
            run_phase(url, payloads, budget, args.clients, args.warm_up, args.max_seconds, f"warm-up {phase}")
            before = requests.get(f"{url}/metrics", timeout=10).json()
            row = run_phase(url, payloads, budget, args.clients, args.requests, args.max_seconds, phase)
            after = requests.get(f"{url}/metrics", timeout=10).json()
            row |= {"budget": budget, "max_batch_size": batch_size, "images_per_s": row["requests_per_s"],
                    "mean_batch_size": _mean_batch(before, after), "metrics": after}
            results[phase] = row
    finally:
        for running in servers.values():
            running.stop()
    if args.rounds > 1:
        for name in names:
            rows = [row for row in results.values() if row["budget"] == name and row["max_batch_size"] > 1]
            results[f"batching on, {name}, {args.rounds} rounds pooled"] = pooled(rows, name) | {"pooled": True}
    if args.bare:
        bare_runs.append(bare_arrangements(args, budgets, args.out.with_suffix(".bare_after.json")))
        for row in results.values():
            if row["max_batch_size"] == args.max_batch_size and row["budget"] in bare_runs[0]["one_process"]:
                # every round; the reference is the arrangement that serves more (mean of its runs before and after)
                runs = {name: [run[name][row["budget"]] for run in bare_runs] for name in bare_runs[0]}
                reference = max(runs, key=lambda name: statistics.mean(runs[name]))
                row |= {"bare_images_per_s": statistics.mean(runs[reference]), "bare_reference": reference,
                        "bare_images_per_s_runs": runs,
                        "server_over_bare": row["images_per_s"] / statistics.mean(runs[reference])}
    summary = _summary(results, names, args.max_batch_size, args.rounds)
    print(f"\n{args.clients} concurrent clients on 127.0.0.1; server: {info.get('model', {})}")
    print("| phase | requests | req/s = img/s | p50 ms | p99 ms | mean batch | bare img/s | server / bare |")
    print("|---|---|---|---|---|---|---|---|")
    for phase, row in results.items():
        bare_text = (f"{row['bare_images_per_s']:.2f} ({row['bare_reference'].replace('_', ' ')}) | "
                     f"{100 * row['server_over_bare']:.0f}%"
                     if "bare_images_per_s" in row else "- | -")
        print(f"| {phase} | {row['requests']} | {row['requests_per_s']:.2f} | {_ms(row['p50_ms'])} | "
              f"{_ms(row['p99_ms'])} | {row['mean_batch_size'] or 0:.1f} | {bare_text} |")
    print("\n" + json.dumps(summary, indent=1))
    for row in results.values():
        row.pop("latencies", None)
    args.out.write_text(json.dumps({"clients": args.clients, "rounds": args.rounds,
                                    "keep_freed_memory": args.keep_freed_memory, "budgets": budgets,
                                    "device": args.device, "serve_args": args.serve_args, "workers": args.workers,
                                    "dtype": args.dtype, "threads": args.threads, "server_info": info,
                                    "phases": results, "summary": summary}, indent=2))
    print(f"wrote {args.out}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _mean_batch(before: dict, after: dict) -> float | None:
    """The mean batch size of this phase's requests alone (the server's counters also hold the warm-up's)."""
    counts = {size: count - before["batch_size_counts"].get(size, 0)
              for size, count in after["batch_size_counts"].items()}
    served = sum(counts.values())
    return sum(int(size) * count for size, count in counts.items()) / served if served else None


def _summary(results: dict, names: list[str], max_batch_size: int, rounds: int = 1) -> dict:
    batched = {row["budget"]: row for row in results.values()
               if row["max_batch_size"] == max_batch_size and (rounds == 1 or row.get("pooled"))}
    summary: dict = {"requests_per_s": {name: row["requests_per_s"] for name, row in batched.items()}}
    off = [row for row in results.values() if row["max_batch_size"] == 1]
    if off and names[0] in batched:
        summary["batching_speedup"] = batched[names[0]]["requests_per_s"] / off[0]["requests_per_s"]
    if "half" in batched and "full" in batched:
        summary["half_over_full"] = batched["half"]["requests_per_s"] / batched["full"]["requests_per_s"]
        summary["half_over_full_at_least_1.8"] = summary["half_over_full"] >= 1.8
        if rounds > 1:
            summary["half_over_full_per_round"] = [
                half / full for half, full in zip(batched["half"]["requests_per_s_per_round"],
                                                  batched["full"]["requests_per_s_per_round"], strict=True)]
    shares = {name: row["server_over_bare"] for name, row in batched.items() if "server_over_bare" in row}
    if shares:
        summary["server_over_bare"] = shares
        summary["server_at_least_90%_of_bare"] = all(share >= 0.9 for share in shares.values())
    return summary


if __name__ == "__main__":
    main()
