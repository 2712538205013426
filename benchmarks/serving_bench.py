"""Online top-K on Ray Serve (hm4sr_dist.serving.online): latency and throughput by concurrency.

    python benchmarks/serving_bench.py /path/to/export                 # 1, 8 and 32 clients
    python benchmarks/serving_bench.py /path/to/export --concurrency 1 8 32 --requests 300 \
        --seconds 30 --max-batch-size 32 --batch-wait-ms 5 --note "busy 2-core box"
    python benchmarks/serving_bench.py /path/to/export --url http://127.0.0.1:8000   # a running service

Bounded and local: each concurrency level sends at most `--requests` requests (after a warm-up of
`--warmup` per client) or stops after `--seconds`, whichever comes first, and talks to 127.0.0.1
only (a --url elsewhere is refused). Without --url it starts its own Ray (`address="local"`: never
an existing cluster) and the application on a free port, and shuts both down at the end.

Each client is a thread with one keep-alive HTTP connection sending POST /recommend back to back
(a closed loop: the next request leaves when the answer is in), with random histories of
`--history-len` (item, time) pairs drawn from the export's items. Reported per level: requests
answered, errors, requests/s (answered / wall time), p50 / p99 / mean latency, and the mean batch
size the replica scored (its GET /stats, before and after). The clients share the machine with
the service: on a small or busy machine the numbers measure both. Prints a table; `--out` also
writes JSON. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive connection to the service."""

    def __init__(self, url: str, timeout: float):
        parsed = urllib.parse.urlsplit(url)
        if parsed.hostname not in LOCAL_HOSTS:
            raise SystemExit(f"error: --url {url}: this benchmark talks to 127.0.0.1 only")
        self.host, self.port, self.prefix = parsed.hostname, parsed.port or 80, parsed.path.rstrip("/")
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def call(self, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):                       # one reconnect: the server may close idle connections
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                self.conn.request("POST" if body is not None else "GET", self.prefix + path, body=body,
                                  headers=headers)
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, path: str) -> dict:
        status, data = self.call(path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {data[:200]!r}")
        return json.loads(data)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def request_bodies(export: Path, n: int, history_len: int, k: int, seed: int) -> list[bytes]:
    """`n` POST /recommend bodies: random items of the export, times an hour apart after its data."""
    import pyarrow.parquet as pq

    raw = pq.read_table(export / "items.parquet", columns=["raw_id"]).column("raw_id").to_pylist()
    manifest = json.loads((export / "manifest.json").read_text())
    t_end = int(manifest["time"]["max"])
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(n):
        items = rng.integers(0, len(raw), size=history_len)
        times = t_end - 3600 * history_len + 3600 * np.arange(history_len)
        history = [[raw[int(i)], int(t)] for i, t in zip(items, times)]
        bodies.append(json.dumps({"history": history, "k": k}).encode())
    return bodies


def run_level(url: str, bodies: list[bytes], clients: int, requests: int, seconds: float, warmup: int,
              timeout: float) -> dict:
    """`clients` closed-loop clients; at most `requests` requests after warm-up, or `seconds`."""
    stats_client = Client(url, timeout)
    lock = threading.Lock()
    sent = 0
    latencies: list[float] = []
    errors: list[str] = []
    clock = {"began": 0.0, "stop_at": float("inf")}

    def release() -> None:                     # runs once, when every client is warmed up, before any goes on
        clock["before"] = stats_client.json("/stats")  # the warm-up's batches are counted before
        clock["began"] = time.perf_counter()
        clock["stop_at"] = clock["began"] + seconds

    barrier = threading.Barrier(clients + 1, action=release)

    def take() -> int | None:
        nonlocal sent
        with lock:
            if sent >= requests or time.perf_counter() > clock["stop_at"]:
                return None
            sent += 1
            return sent

    def worker(index: int) -> None:
        client = Client(url, timeout)
        try:
            for j in range(warmup):
                client.call("/recommend", bodies[(index * 7919 + j) % len(bodies)])
            barrier.wait()
            while (n := take()) is not None:
                start = time.perf_counter()
                try:
                    status, data = client.call("/recommend", bodies[(n * 31 + index) % len(bodies)])
                except Exception as exc:           # noqa: BLE001 - counted as an error
                    status, data = -1, repr(exc).encode()
                elapsed = time.perf_counter() - start
                with lock:
                    if status == 200:
                        latencies.append(elapsed)
                    else:
                        errors.append(f"{status} {data[:120]!r}")
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait(timeout=timeout * (warmup + 1) + 60)
    for t in threads:
        t.join(timeout=seconds + timeout + 60)
    wall = time.perf_counter() - clock["began"]
    after, before = stats_client.json("/stats"), clock["before"]
    stats_client.close()
    lat = np.array(latencies) * 1000
    batches = after["batches"] - before["batches"]
    scored = sum(int(s) * c for s, c in after["batch_sizes"].items()) - \
        sum(int(s) * c for s, c in before["batch_sizes"].items())
    return {"clients": clients, "answered": len(latencies), "errors": len(errors), "wall_s": wall,
            "rps": len(latencies) / wall if wall > 0 else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "mean_ms": float(lat.mean()) if len(lat) else None,
            "mean_batch": scored / batches if batches else None, "largest_batch": after["largest_batch"],
            "first_errors": errors[:3]}


def table(rows: list[dict]) -> str:
    head = f"{'clients':>7} {'answered':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} " \
           f"{'mean ms':>8} {'mean batch':>10}"
    lines = [head, "-" * len(head)]
    def fmt(value, spec: str) -> str:
        width = int(spec.split(".")[0])
        return "-".rjust(width) if value is None else format(value, spec)

    for r in rows:
        lines.append(f"{r['clients']:>7} {r['answered']:>8} {r['errors']:>6} {fmt(r['rps'], '8.1f')} "
                     f"{fmt(r['p50_ms'], '8.1f')} {fmt(r['p99_ms'], '8.1f')} {fmt(r['mean_ms'], '8.1f')} "
                     f"{fmt(r['mean_batch'], '10.2f')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", type=Path, help="an hm4sr-export folder (also read for item IDs with --url)")
    parser.add_argument("--url", help="a running service on 127.0.0.1 (default: start one)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=300, help="requests per level (after warm-up)")
    parser.add_argument("--seconds", type=float, default=30.0, help="longest time per level")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up requests per client")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--history-len", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="a label for the numbers (e.g. the machine's load)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    bodies = request_bodies(args.export, 512, args.history_len, args.k, args.seed)
    started = args.url is None
    url = args.url
    if started:
        import ray
        from ray import serve

        from hm4sr_dist.serving.online import start

        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        url = start(args.export, port=free_port(), host="127.0.0.1", name="hm4sr-bench",
                    num_replicas=args.replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                    max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000)
    try:
        probe = Client(url, args.timeout)
        deadline = time.monotonic() + 120
        while True:
            try:
                health = probe.json("/healthz")
                break
            except (OSError, RuntimeError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    raise SystemExit(f"error: {url}/healthz did not answer within 120 s") from None
                time.sleep(0.5)
        probe.close()
        print(f"{url}: run {health['identity']}, {health['items']} items, device {health['device']}; "
              f"k {args.k}, history {args.history_len}, max_batch_size {args.max_batch_size}, batch wait "
              f"{args.batch_wait_ms} ms, {args.replicas} replica(s); {os.cpu_count()} CPUs on "
              f"{platform.node()}; load average {os.getloadavg()[0]:.2f} {args.note}".rstrip(), flush=True)
        rows = []
        for clients in args.concurrency:
            rows.append(run_level(url, bodies, clients, args.requests, args.seconds, args.warmup, args.timeout))
            r = rows[-1]
            print(f"  {clients} clients: {r['answered']} answered, {r['errors']} errors, {r['rps']:.1f} req/s",
                  flush=True)
            if r["first_errors"]:
                print(f"    first errors: {r['first_errors']}", flush=True)
        print(table(rows))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "health": health,
                                            "load_average": os.getloadavg(), "rows": rows}, indent=2))
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
