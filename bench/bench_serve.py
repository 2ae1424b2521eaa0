"""matterhorn_serve on loopback: throughput and latency of POST /infer from concurrent keep-alive
clients, /health latency while slow clients hold connections open, and the server's peak memory.

The served model: a TorchScript Conv2d(2, 8, 3) -> BatchNorm2d -> Linear(8*16*16, 10) of our
layers on [T, B, 2, 16, 16] spikes (T=4, B=8: 64 KiB in, 1.25 KiB out). The clients are Python
threads on the same machine, so on few cores they share the CPUs with the server.

    .venv/bin/python bench/bench_serve.py [--clients 8] [--requests 250] [--threads 8] [--slow 32]
"""

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import matterhorn_pytorch as mth  # noqa: E402
from common import machine  # noqa: E402

SERVE = Path(mth._C.__file__).resolve().parent / "bin" / "matterhorn_serve"
T, B = 4, 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = mth.snn.Conv2d(2, 8, 3, padding=1)
        self.bn = mth.snn.BatchNorm2d(8)
        self.fc = mth.snn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(2))


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * fraction))]


def load(port, clients, requests, x, expected):
    """`clients` threads, each on one keep-alive connection, `requests` requests each."""
    body, headers = x.numpy().tobytes(), {"X-Shape": ",".join(map(str, x.shape)), "X-Dtype": "float32"}
    latencies, errors = [], []

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for _ in range(requests):
                start = time.perf_counter()
                connection.request("POST", "/infer", body, headers)
                response = connection.getresponse()
                answer = response.read()
                latencies.append(time.perf_counter() - start)
                if response.status != 200 or answer != expected:
                    errors.append(response.status)
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} wrong answers, statuses {sorted(set(errors))}")
    return clients * requests / elapsed, latencies


def health_under_slow_clients(port, slow, samples=40):
    """/health latencies while `slow` connections each send one header byte every 0.5 s."""
    header = b"POST /infer HTTP/1.1\r\nHost: x\r\nX-Shape: 4,8,2,16,16\r\n"
    connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(slow)]
    done = threading.Event()

    def trickle():
        position = 0
        while not done.wait(0.5):
            for connection in connections:
                try:
                    connection.sendall(header[position % len(header):][:1])
                except OSError:
                    pass
            position += 1

    thread = threading.Thread(target=trickle)
    thread.start()
    latencies = []
    try:
        for _ in range(samples):
            start = time.perf_counter()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", "/health")
            assert connection.getresponse().status == 200
            connection.close()
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)
    finally:
        done.set()
        thread.join()
        for connection in connections:
            connection.close()
    return latencies


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=250, help="per client")
    parser.add_argument("--threads", type=int, default=8, help="the server's inference threads")
    parser.add_argument("--slow", type=int, default=32, help="slow clients during the /health measurement")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model((torch.rand(T, B, 2, 16, 16) < 0.3).float())  # running statistics that are not the identity
    model.eval()
    x = (torch.rand(T, B, 2, 16, 16) < 0.15).float()
    with torch.no_grad():
        expected = model(x).numpy().tobytes()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "net.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(model).save(str(path))
        # The slow clients must outlast the measurement: a timeout longer than it.
        server = subprocess.Popen([str(SERVE), str(path), "--threads", str(args.threads), "--timeout", "60"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline().rsplit(":", 1)[1])
            idle_rss = status_kib(server.pid, "VmRSS")
            load(port, args.clients, 20, x, expected)  # warm-up
            throughput, latencies = load(port, args.clients, args.requests, x, expected)
            health = health_under_slow_clients(port, args.slow)
            peak = status_kib(server.pid, "VmHWM")
        finally:
            server.terminate()
            server.wait(timeout=20)

    print(f"matterhorn_serve bench: {machine()}; server --threads {args.threads}")
    print(f"model: Conv2d-BatchNorm2d-Linear, input [{T}, {B}, 2, 16, 16] float32 ({x.numel() * 4 // 1024} KiB)")
    print("| measure | value |")
    print("|---|---|")
    print(f"| POST /infer, {args.clients} keep-alive clients x {args.requests} | {throughput:.0f} requests/s |")
    print(f"| latency p50 / p99 | {1e3 * statistics.median(latencies):.2f} / {1e3 * percentile(latencies, 0.99):.2f} ms |")
    print(f"| GET /health beside {args.slow} slow clients, p50 / max of {len(health)} | "
          f"{1e3 * statistics.median(health):.2f} / {1e3 * max(health):.2f} ms |")
    print(f"| server RSS idle / peak | {idle_rss / 1024:.0f} / {peak / 1024:.0f} MiB |")


if __name__ == "__main__":
    main()
