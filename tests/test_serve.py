"""The inference server (matterhorn_serve) on a loopback port: 8 concurrent clients x 200
requests mixed with malformed bodies, wrong dtypes, wrong shapes and oversized requests; every
good answer equals the Python output, every bad one is a 4xx with a message, the health endpoint
answers throughout. Prints requests/s and p50/p99 latency."""

import http.client
import json
import statistics
import subprocess
import threading
import time
import warnings

import pytest
import torch

from conftest import PACKAGE_BINARY_DIR
from models import ConvBNLinear

SERVE = PACKAGE_BINARY_DIR / "bin" / "matterhorn_serve"
CLIENTS, REQUESTS = 8, 200
MAX_BYTES = 1 << 20


@pytest.fixture
def server(tmp_path):
    model = ConvBNLinear()
    with torch.no_grad():
        model(torch.randn(4, 3, 2, 6, 6) * 2 + 1)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(tmp_path / "model.pt"))
    process = subprocess.Popen([str(SERVE), str(tmp_path / "model.pt"), "--threads", "8", "--max-bytes", str(MAX_BYTES)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line + process.stderr.read()
        yield model, int(line.rsplit(":", 1)[1])
    finally:
        process.terminate()
        process.wait(timeout=10)


def request(port, method, path, body=b"", headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def infer(port, x, shape=None, dtype="float32"):
    body = x.numpy().tobytes() if isinstance(x, torch.Tensor) else x
    headers = {"X-Shape": ",".join(map(str, shape if shape is not None else x.shape)), "X-Dtype": dtype}
    return request(port, "POST", "/infer", body, headers)


def test_health_and_one_answer(server):
    model, port = server
    status, _, body = request(port, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    x = torch.randn(3, 2, 2, 6, 6)
    status, headers, body = infer(port, x)
    assert status == 200 and headers["X-Shape"] == "3,2,5"
    torch.testing.assert_close(torch.frombuffer(bytearray(body), dtype=torch.float32).view(3, 2, 5), model(x))


def test_bad_requests_get_a_4xx_with_a_message(server):
    _, port = server
    x = torch.randn(3, 2, 2, 6, 6)
    cases = [
        (infer(port, x.numpy().tobytes()[:-4], x.shape), 400, "bytes"),
        (infer(port, x, dtype="float64"), 415, "X-Dtype"),
        (request(port, "POST", "/infer", x.numpy().tobytes(), {"X-Shape": "3,x,2"}), 400, "X-Shape"),
        (request(port, "POST", "/infer", x.numpy().tobytes()), 400, "missing X-Shape"),
        (infer(port, torch.randn(3, 2, 3, 6, 6)), 422, "Conv2d(in_channels=2)"),
        (infer(port, torch.randn(2, 6, 6)), 422, "expected input"),
        (request(port, "GET", "/nothing"), 404, "no such endpoint"),
    ]
    for (status, _, body), expected_status, words in cases:
        assert status == expected_status, body
        assert words in json.loads(body)["error"]


def test_many_concurrent_clients_with_bad_requests_mixed_in(server):
    model, port = server
    inputs = [torch.randn(t, b, 2, 6, 6) for t, b in [(2, 1), (3, 2), (4, 3), (1, 4)]]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    latencies, failures, health = [], [], {"ok": 0, "bad": 0}
    done = threading.Event()

    def poll_health():
        while not done.is_set():
            status, _, _ = request(port, "GET", "/health")
            health["ok" if status == 200 else "bad"] += 1
            time.sleep(0.02)

    def client(index):
        for i in range(REQUESTS):
            kind = (index + i) % 10
            try:
                if kind == 3:  # malformed body
                    status, _, body = infer(port, b"\0" * 10, (3, 2, 2, 6, 6))
                    assert status == 400 and json.loads(body)["error"]
                elif kind == 5:  # wrong dtype
                    status, _, body = infer(port, inputs[0], dtype="int64")
                    assert status == 415 and json.loads(body)["error"]
                elif kind == 7:  # wrong shape for the model
                    status, _, body = infer(port, torch.randn(2, 2, 2, 5, 5))
                    assert status == 422 and json.loads(body)["error"]
                elif kind == 9 and i % 20 == 9:  # oversized
                    status, _, body = infer(port, b"\0" * (MAX_BYTES + 4096), (MAX_BYTES // 4 + 1024,))
                    assert status == 413 and json.loads(body)["error"]
                else:
                    x, y = inputs[i % len(inputs)], expected[i % len(inputs)]
                    start = time.perf_counter()
                    status, headers, body = infer(port, x)
                    latencies.append(time.perf_counter() - start)
                    assert status == 200, body
                    answer = torch.frombuffer(bytearray(body), dtype=torch.float32).view(y.shape)
                    torch.testing.assert_close(answer, y)
            except Exception as error:  # collected: a failing client thread must fail the test
                failures.append(f"client {index} request {i} (kind {kind}): {error!r}")

    health_thread = threading.Thread(target=poll_health)
    health_thread.start()
    start = time.perf_counter()
    clients = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    elapsed = time.perf_counter() - start
    done.set()
    health_thread.join()

    assert not failures, failures[:5]
    assert health["bad"] == 0 and health["ok"] > 0
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(f"\nmatterhorn_serve: {CLIENTS * REQUESTS} requests ({len(latencies)} good) from {CLIENTS} clients in "
          f"{elapsed:.2f} s: {CLIENTS * REQUESTS / elapsed:.0f} requests/s, good-request latency "
          f"p50 {1e3 * p50:.2f} ms, p99 {1e3 * p99:.2f} ms, mean {1e3 * statistics.mean(latencies):.2f} ms")
