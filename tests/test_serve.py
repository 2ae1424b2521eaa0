"""The inference server (matterhorn_serve) on a loopback port: the endpoint contract, every error
as a JSON message with its status and nothing internal, option checks, JSON escaping. Hostile
clients are in test_tools_hostile.py, the load test in test_server_stress.py; both use the
helpers here."""

import contextlib
import http.client
import json
import socket
import subprocess
import time
import warnings

import pytest
import torch
import torch.nn as nn

import matterhorn_pytorch as mth
from conftest import PACKAGE_BINARY_DIR
from models import ConvBNLinear

SERVE = PACKAGE_BINARY_DIR / "bin" / "matterhorn_serve"
MAX_BYTES = 1 << 20
# What a response may carry as headers: nothing else (no exception text, no backtrace).
RESPONSE_HEADERS = {"server", "content-type", "content-length", "connection", "x-shape", "x-dtype", "allow"}


class BatchNormFirst(nn.Module):
    """[T, B, 2, H, W] -> the same, BatchNorm first: zero-size H or W reaches the op directly."""

    def __init__(self):
        super().__init__()
        self.bn = mth.snn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(x))


def save_script(model: nn.Module, path) -> nn.Module:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(path))
    return model


def conv_bn_linear(path) -> nn.Module:
    """The served network of these tests, with running statistics that are not the identity."""
    model = ConvBNLinear()
    with torch.no_grad():
        model(torch.randn(4, 3, 2, 6, 6) * 2 + 1)
    return save_script(model, path)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


@contextlib.contextmanager
def start_server(model_path, *options, log=None):
    """Runs matterhorn_serve; yields (process, port). On leaving, the server must still be running
    (no crash during the test) and must stop cleanly on SIGTERM (exit status 0)."""
    log_file = open(log, "w") if log else subprocess.DEVNULL
    process = subprocess.Popen([str(SERVE), str(model_path), *map(str, options)],
                               stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line + (open(log).read() if log else "")
        yield process, int(line.rsplit(":", 1)[1])
        assert process.poll() is None, f"the server died during the test: exit status {process.returncode}"
    finally:
        process.terminate()
        status = process.wait(timeout=20)
        if log:
            log_file.close()
    assert status == 0, f"the server ended with status {status} on SIGTERM"


def request(port, method, path, body=b"", headers=None, timeout=30):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def infer(port, x, shape=None, dtype="float32", **kwargs):
    body = x.numpy().tobytes() if isinstance(x, torch.Tensor) else x
    headers = {"X-Shape": ",".join(map(str, shape if shape is not None else x.shape)), "X-Dtype": dtype}
    return request(port, "POST", "/infer", body, headers, **kwargs)


def raw_exchange(port, data: bytes, timeout=10.0) -> bytes:
    """Sends raw bytes and reads until the server closes the connection or `timeout` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        return read_until_closed(connection, timeout)


def read_until_closed(connection, timeout) -> bytes:
    received, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        connection.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = connection.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        received += chunk
    return received


def parse_response(raw: bytes):
    """(status, headers with lower-case names, body) of the first HTTP response in `raw`."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((name.strip().lower(), value.strip()) for name, value in (line.split(":", 1) for line in lines[1:]))
    return int(lines[0].split()[1]), headers, rest[:int(headers.get("content-length", len(rest)))]


def assert_clean_error(status, headers, body, expected_status, words=""):
    """A JSON error with the expected status and words, and nothing of the server's internals."""
    assert status == expected_status, (status, body)
    assert {name.lower() for name in headers} <= RESPONSE_HEADERS, headers
    message = json.loads(body)["error"]
    assert words in message, message
    for internal in ("Exception raised from", "frame #", ".cpp", "c10::", "at::", "Traceback", "\n"):
        assert internal not in message, message
    return message


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    model = conv_bn_linear(directory / "model.pt")
    with start_server(directory / "model.pt", "--threads", 4, "--max-bytes", MAX_BYTES, log=directory / "log") as (_, port):
        yield model, port


def test_health_and_one_answer(served):
    model, port = served
    status, _, body = request(port, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    x = torch.randn(3, 2, 2, 6, 6)
    status, headers, body = infer(port, x)
    assert status == 200 and headers["X-Shape"] == "3,2,5" and headers["X-Dtype"] == "float32"
    torch.testing.assert_close(torch.frombuffer(bytearray(body), dtype=torch.float32).view(3, 2, 5), model(x))


def test_keep_alive_connection_serves_many_requests(served):
    model, port = served
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for t in (1, 2, 3):
            x = torch.randn(t, 2, 2, 6, 6)
            connection.request("POST", "/infer", x.numpy().tobytes(), {"X-Shape": ",".join(map(str, x.shape))})
            response = connection.getresponse()
            assert response.status == 200 and response.getheader("Connection") != "close"
            torch.testing.assert_close(torch.frombuffer(bytearray(response.read()), dtype=torch.float32).view(t, 2, 5),
                                       model(x))
        connection.request("GET", "/nothing")  # an error keeps the connection too
        response = connection.getresponse()
        assert response.status == 404 and json.loads(response.read())["error"]
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
    finally:
        connection.close()


def test_expect_100_continue_is_answered_before_the_body(served):
    model, port = served
    x = torch.randn(2, 1, 2, 6, 6)
    body = x.numpy().tobytes()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nX-Shape: 2,1,2,6,6\r\nConnection: close\r\n"
                           b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert connection.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        connection.sendall(body)
        status, _, answer = parse_response(read_until_closed(connection, 10))
    assert status == 200
    torch.testing.assert_close(torch.frombuffer(bytearray(answer), dtype=torch.float32).view(2, 1, 5), model(x))


def test_bad_requests_get_a_4xx_with_a_message(served):
    _, port = served
    x = torch.randn(3, 2, 2, 6, 6)
    cases = [
        (infer(port, x.numpy().tobytes()[:-4], x.shape), 400, "bytes"),
        (infer(port, x, dtype="float64"), 415, "X-Dtype"),
        (request(port, "POST", "/infer", x.numpy().tobytes(), {"X-Shape": "3,x,2"}), 400, "X-Shape"),
        (request(port, "POST", "/infer", x.numpy().tobytes(), {"X-Shape": "3,,2"}), 400, "X-Shape"),
        (request(port, "POST", "/infer", x.numpy().tobytes(), {"X-Shape": "-3,2"}), 400, "X-Shape"),
        (request(port, "POST", "/infer", b"", {"X-Shape": ",".join(["1"] * 9)}), 400, "1 to 8"),
        (request(port, "POST", "/infer", b"", {"X-Shape": "99999999999999999999"}), 400, "X-Shape"),
        (request(port, "POST", "/infer", x.numpy().tobytes()), 400, "missing X-Shape"),
        (infer(port, torch.randn(3, 2, 3, 6, 6)), 422, "Conv2d(in_channels=2)"),
        (infer(port, torch.randn(2, 6, 6)), 422, "expected input"),
        (request(port, "GET", "/nothing"), 404, "no such endpoint"),
        (request(port, "GET", "/infer"), 405, "POST"),
        (request(port, "POST", "/health", b"{}"), 405, "GET"),
        (infer(port, b"\0" * (MAX_BYTES + 4), (MAX_BYTES // 4 + 1,)), 413, "larger than this server accepts"),
    ]
    for (status, headers, body), expected_status, words in cases:
        assert_clean_error(status, headers, body, expected_status, words)
    assert request(port, "GET", "/health")[0] == 200


def test_a_shape_too_large_to_exist_is_a_400_with_nothing_internal(served):
    _, port = served
    for shape in ["0,1099511627776,1099511627776,1099511627776", "1099511627776", f"0,{MAX_BYTES // 4 + 1}"]:
        status, headers, body = request(port, "POST", "/infer", b"", {"X-Shape": shape})
        assert_clean_error(status, headers, body, 400, "larger than this server accepts")
    status, headers, body = request(port, "POST", "/infer", b"", {"X-Shape": "0,4611686018427387904,8"})
    assert_clean_error(status, headers, body, 400, "X-Shape must be")
    # the largest shape the limit allows, with a zero size: an empty answer (the model rejects it)
    status, headers, body = request(port, "POST", "/infer", b"", {"X-Shape": f"0,{MAX_BYTES // 4}"})
    assert_clean_error(status, headers, body, 422)


def test_model_failures_become_json_errors_without_internals(tmp_path):
    class Raises(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.numel() == 3:
                raise RuntimeError("boom in /src/secret/kernel.cpp:123")
            if x.numel() == 4:
                raise ValueError("x must not hold four values")
            return x

    class Tuple(nn.Module):
        def forward(self, x: torch.Tensor):
            return x, x

    save_script(Raises(), tmp_path / "raises.pt")
    save_script(Tuple(), tmp_path / "tuple.pt")
    with start_server(tmp_path / "raises.pt", log=tmp_path / "log") as (_, port):
        message = assert_clean_error(*infer(port, torch.ones(3)), 422)
        assert "secret" not in message and "123" not in message
        assert_clean_error(*infer(port, torch.ones(4)), 422, "x must not hold four values")
        assert infer(port, torch.ones(5))[0] == 200
    assert "boom in /src/secret/kernel.cpp:123" in (tmp_path / "log").read_text()  # the operator sees it
    with start_server(tmp_path / "tuple.pt") as (_, port):
        assert_clean_error(*infer(port, torch.ones(5)), 500, "not a tensor")


def test_zero_size_input_through_batchnorm_first(tmp_path):
    """X-Shape 1,1,2,0,8 with an empty body: BatchNorm on zero values must not end the server."""
    save_script(BatchNormFirst(), tmp_path / "bn.pt")
    with start_server(tmp_path / "bn.pt") as (_, port):
        for shape in [(1, 1, 2, 0, 8), (0, 1, 2, 4, 4), (1, 0, 2, 4, 4)]:
            status, headers, body = infer(port, b"", shape)
            assert status == 200 and headers["X-Shape"] == ",".join(map(str, shape)) and body == b"", body
        assert request(port, "GET", "/health")[0] == 200


def test_json_is_escaped_in_health_and_in_errors(tmp_path):
    directory = tmp_path / 'odd "name" \\ with\ttab\x01 and \u00e9'
    directory.mkdir()
    model_path = directory / "model.pt"
    conv_bn_linear(model_path)
    with start_server(model_path) as (_, port):
        status, _, body = request(port, "GET", "/health")
        assert status == 200 and json.loads(body)["model"] == str(model_path)
        # header values may carry tabs, quotes, backslashes and bytes that are not UTF-8
        raw = raw_exchange(port, b'POST /infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'
                                 b'X-Shape: 3,\t"\\\xff\xfe,2\r\nContent-Length: 0\r\n\r\n')
        status, headers, body = parse_response(raw)
        message = assert_clean_error(status, headers, body, 400, "X-Shape")
        assert '"\\' in message and "\ufffd" in message
        status, headers, body = parse_response(raw_exchange(
            port, b'POST /infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Shape: 1\r\nX-Dtype: "\t\\\r\n\r\n'))
        assert_clean_error(status, headers, body, 415, "X-Dtype")


@pytest.mark.parametrize("arguments, words", [
    (["--threads", "0"], "--threads takes a whole number from 1 to 256"),
    (["--threads", "-1"], "--threads"),
    (["--threads", "2x"], "--threads"),
    (["--port", "70000"], "--port takes a whole number from 0 to 65535"),
    (["--port", "-1"], "--port"),
    (["--max-bytes", "abc"], "--max-bytes takes a whole number"),
    (["--max-bytes", "0"], "--max-bytes"),
    (["--timeout", "0"], "--timeout"),
    (["--max-connections", "1e9"], "--max-connections"),
    (["--colour", "blue"], "unknown option --colour"),
    (["--port"], "--port needs a value"),
])
def test_invalid_options_are_refused(tmp_path, arguments, words):
    conv_bn_linear(tmp_path / "model.pt")
    result = subprocess.run([str(SERVE), str(tmp_path / "model.pt"), *arguments], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and words in result.stderr and "usage:" in result.stderr, result.stderr
    assert result.stdout == ""


def test_help_and_missing_model(tmp_path):
    result = subprocess.run([str(SERVE), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: matterhorn_serve MODEL"), result
    result = subprocess.run([str(SERVE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no model given" in result.stderr
    result = subprocess.run([str(SERVE), str(tmp_path / "missing.pt")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "cannot load the model" in result.stderr and "missing.pt" in result.stderr


def test_options_with_equals_and_a_fixed_port(tmp_path):
    conv_bn_linear(tmp_path / "model.pt")
    with socket.socket() as probe:  # a port that is free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with start_server(tmp_path / "model.pt", f"--port={port}", "--threads=1", "--timeout=0.5") as (_, bound):
        assert bound == port and request(port, "GET", "/health")[0] == 200
