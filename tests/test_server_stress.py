"""Load with hostile clients mixed in: 8 clients x 200 requests against matterhorn_serve, a third
of them hostile (chunked and compressed bodies, impossible shapes, broken HTTP, clients vanishing
mid-body, wrong dtypes and shapes), while slow clients trickle headers and /health is polled.
Zero crashes, every good answer equal to the Python output, every bad one a JSON 4xx, /health
always within a second, and the server's memory bounded. Prints requests/s and latencies."""

import gzip
import socket
import threading
import time

import torch

from test_serve import (assert_clean_error, conv_bn_linear, infer, parse_response, raw_exchange, request, rss_kib,
                        start_server)

CLIENTS, REQUESTS = 8, 200
MAX_BYTES = 1 << 20
SLOW_CLIENTS = 8


def hostile(port, kind):
    """One hostile request of the given kind; checks the answer where there is one."""
    if kind == 0:  # chunked body past the limit
        chunk = b"%x\r\n" % (1 << 19) + b"\0" * (1 << 19) + b"\r\n"
        raw = raw_exchange(port, b"POST /infer HTTP/1.1\r\nHost: x\r\nX-Shape: 393216\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + chunk * 3)
        assert_clean_error(*parse_response(raw), 413)
    elif kind == 1:  # compressed body
        body = gzip.compress(b"\0" * (4 << 20))
        raw = raw_exchange(port, b"POST /infer HTTP/1.1\r\nHost: x\r\nX-Shape: 1048576\r\nContent-Encoding: gzip\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert_clean_error(*parse_response(raw), 415)
    elif kind == 2:  # a shape that cannot exist
        status, headers, body = request(port, "POST", "/infer", b"", {"X-Shape": "0,1099511627776,1099511627776,1099511627776"})
        assert_clean_error(status, headers, body, 400)
    elif kind == 3:  # not HTTP
        assert_clean_error(*parse_response(raw_exchange(port, b"\x00\xff GARBAGE \r\n\r\n")), 400)
    elif kind == 4:  # vanishes mid-body
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nX-Shape: 3,2,2,6,6\r\nContent-Length: 1728\r\n\r\n" + b"\0" * 900)
    elif kind == 5:  # wrong dtype, malformed body
        assert_clean_error(*infer(port, b"\0" * 16, (4,), dtype="int64"), 415)
        assert_clean_error(*infer(port, b"\0" * 10, (3, 2, 2, 6, 6)), 400)
    elif kind == 6:  # wrong shape for the model, zero-size input
        assert_clean_error(*infer(port, torch.randn(2, 2, 2, 5, 5)), 422)
        assert_clean_error(*infer(port, b"", (1, 1, 2, 0, 8)), 422)


def test_eight_clients_with_a_third_hostile_and_slow_clients(tmp_path):
    model = conv_bn_linear(tmp_path / "model.pt")
    inputs = [torch.randn(t, b, 2, 6, 6) for t, b in [(2, 1), (3, 2), (4, 3), (1, 4)]]
    with torch.no_grad():
        expected = [model(x) for x in inputs]

    with start_server(tmp_path / "model.pt", "--threads", 8, "--max-bytes", MAX_BYTES, "--timeout", 2,
                      log=tmp_path / "log") as (process, port):
        for x in inputs * 10:  # warm-up: the model's first runs and the allocator's pools
            assert infer(port, x)[0] == 200
        rss_before = rss_kib(process.pid)

        latencies, health_latencies, failures = [], [], []
        slow_reopened = [0]
        done = threading.Event()

        def poll_health():
            while not done.is_set():
                start = time.perf_counter()
                status, _, _ = request(port, "GET", "/health", timeout=10)
                health_latencies.append(time.perf_counter() - start)
                if status != 200:
                    failures.append(f"/health answered {status}")
                time.sleep(0.05)

        def slow_clients():
            header = b"POST /infer HTTP/1.1\r\nHost: x\r\nX-Shape: 1,1,2,6,6\r\nContent-Length: 288\r\n\r\n"
            connections = [[socket.create_connection(("127.0.0.1", port)), 0] for _ in range(SLOW_CLIENTS)]
            while not done.wait(0.3):
                for entry in connections:
                    try:
                        entry[0].sendall(header[entry[1] % len(header):][:1])
                        entry[1] += 1
                    except OSError:  # timed out by the server: come back
                        entry[0].close()
                        entry[:] = [socket.create_connection(("127.0.0.1", port)), 0]
                        slow_reopened[0] += 1
            for connection, _ in connections:
                connection.close()

        def client(index):
            for i in range(REQUESTS):
                kind = (index + i) % 3
                try:
                    if kind == 0:
                        hostile(port, (index * REQUESTS + i) // 3 % 7)
                        continue
                    x, y = inputs[i % len(inputs)], expected[i % len(inputs)]
                    start = time.perf_counter()
                    status, headers, body = infer(port, x)
                    latencies.append(time.perf_counter() - start)
                    assert status == 200, body
                    answer = torch.frombuffer(bytearray(body), dtype=torch.float32).view(y.shape)
                    torch.testing.assert_close(answer, y)
                except Exception as error:  # collected: a failing client thread must fail the test
                    failures.append(f"client {index} request {i} (kind {kind}): {error!r}")

        helpers = [threading.Thread(target=poll_health), threading.Thread(target=slow_clients)]
        for thread in helpers:
            thread.start()
        start = time.perf_counter()
        clients = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        elapsed = time.perf_counter() - start
        done.set()
        for thread in helpers:
            thread.join()
        rss_after, rss_peak = rss_kib(process.pid), rss_kib(process.pid, "VmHWM")

    assert not failures, failures[:5]
    good = sum(1 for c in range(CLIENTS) for i in range(REQUESTS) if (c + i) % 3)
    assert len(latencies) == good
    assert health_latencies and max(health_latencies) < 1, max(health_latencies)
    # Bodies are at most 1 MB and a few dozen connections are open: growth beyond that is a leak.
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(f"\nmatterhorn_serve: {CLIENTS * REQUESTS} requests ({good} good) from {CLIENTS} clients in {elapsed:.2f} s "
          f"({CLIENTS * REQUESTS / elapsed:.0f} requests/s) beside {SLOW_CLIENTS} slow clients (reconnected "
          f"{slow_reopened[0]} times); good p50 {1e3 * p50:.2f} ms, p99 {1e3 * p99:.2f} ms; /health max "
          f"{1e3 * max(health_latencies):.1f} ms; RSS {rss_before // 1024} -> {rss_after // 1024} MiB, peak {rss_peak // 1024} MiB")
