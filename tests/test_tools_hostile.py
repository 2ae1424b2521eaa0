"""Hostile input to the C++ programs. Files: damaged torch.save records for matterhorn_run_model
(the input loader) and matterhorn::load_state_dict (through examples/cpp/snn_inference), and
outputs that cannot be written. Clients: chunked and compressed bodies past the limit, slow and
idle connections, header floods, broken HTTP, too many connections. Each case that could crash the
program runs in a child process, so a crash fails the test."""

import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import CPP_EXAMPLE, RUN_MODEL
from test_serve import (assert_clean_error, conv_bn_linear, infer, parse_response, raw_exchange, read_until_closed,
                        request, rss_kib, save_script, start_server)


def replace_record(path: Path, index: int, data: bytes):
    """Rewrites the torch.save file at `path` with storage record `index` (data/<index>) replaced."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info.filename)) for info in archive.infolist()]
    names = [info.filename for info, _ in entries]
    assert any(name.endswith(f"/data/{index}") for name in names), names
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, content in entries:
            archive.writestr(info, data if info.filename.endswith(f"/data/{index}") else content)


def run(*arguments, timeout=120):
    return subprocess.run([str(a) for a in arguments], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


# ---- matterhorn_run_model: the input loader and the output file ----

@pytest.fixture(scope="module")
def doubling_model(tmp_path_factory):
    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    path = tmp_path_factory.mktemp("run_model") / "double.pt"
    save_script(Double(), path)
    return path


@pytest.mark.parametrize("tensor, record", [
    (torch.randn(100, 100), b""),                       # empty record: nothing to read
    (torch.randn(100, 100), b"\0" * 8),                 # short record: fewer bytes than the tensor
    (torch.randn(100, 100)[60:], b"\0" * (4 * 100 * 70)),  # a view whose offset lies past the record's end
    (torch.randn(3, 4).t(), b"\0" * 44),               # strided: the last element is missing
])
def test_run_model_refuses_an_input_whose_record_is_too_short(tmp_path, doubling_model, tensor, record):
    torch.save(tensor, tmp_path / "input.pt")
    replace_record(tmp_path / "input.pt", 0, record)
    result = run(RUN_MODEL, doubling_model, tmp_path / "input.pt", tmp_path / "out.pt")
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert f"the tensor in '{tmp_path / 'input.pt'}': its record holds {len(record)} bytes" in result.stderr
    assert "truncated or damaged" in result.stderr and not (tmp_path / "out.pt").exists()


def test_run_model_reads_a_view_whose_record_is_whole(tmp_path, doubling_model):
    x = torch.randn(100, 100)[60:, ::2]
    torch.save(x, tmp_path / "input.pt")
    result = run(RUN_MODEL, doubling_model, tmp_path / "input.pt", tmp_path / "out.pt")
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), x * 2)


@pytest.mark.parametrize("shape", [(3, 2, 2, 0, 6), (0,)])
def test_run_model_reads_an_empty_tensor(tmp_path, doubling_model, shape):
    torch.save(torch.randn(shape), tmp_path / "input.pt")  # a storage of no bytes: nothing to check
    result = run(RUN_MODEL, doubling_model, tmp_path / "input.pt", tmp_path / "out.pt")
    assert result.returncode == 0, result.stderr
    assert torch.load(tmp_path / "out.pt").shape == shape


def test_run_model_refuses_files_that_are_not_one_tensor(tmp_path, doubling_model):
    (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))
    result = run(RUN_MODEL, doubling_model, tmp_path / "garbage.pt")
    assert result.returncode == 1 and "cannot be read as a file written by torch.save" in result.stderr
    torch.save({"x": torch.ones(2)}, tmp_path / "dict.pt")
    result = run(RUN_MODEL, doubling_model, tmp_path / "dict.pt")
    assert result.returncode == 1 and "not a tensor" in result.stderr
    result = run(RUN_MODEL, doubling_model, tmp_path / "missing.pt")
    assert result.returncode == 1 and "cannot open" in result.stderr and "missing.pt" in result.stderr


@pytest.mark.parametrize("output, words", [
    ("missing-directory/out.pt", "No such file or directory"),
    ("/dev/full", "No space left on device"),  # a full disk
])
def test_run_model_fails_when_the_output_cannot_be_written(tmp_path, doubling_model, output, words):
    if output == "/dev/full" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    torch.save(torch.ones(1000), tmp_path / "input.pt")
    target = output if output.startswith("/") else tmp_path / output
    result = run(RUN_MODEL, doubling_model, tmp_path / "input.pt", target)
    assert result.returncode == 1, result
    assert f"cannot write the output to '{target}'" in result.stderr and words in result.stderr


def test_run_model_usage(doubling_model, tmp_path):
    assert run(RUN_MODEL, "--help").returncode == 0
    torch.save(torch.ones(3), tmp_path / "input.pt")
    for threads in ["0", "-1", "x"]:
        result = run(RUN_MODEL, "--threads", threads, "--seconds", "0.1", doubling_model, tmp_path / "input.pt")
        assert result.returncode == 2 and "--threads takes a whole number" in result.stderr
    assert run(RUN_MODEL, "--threads", "2", "--seconds", "0.2", doubling_model, tmp_path / "input.pt").returncode == 0


# ---- matterhorn::load_state_dict, through examples/cpp/snn_inference ----

@pytest.fixture(scope="module")
def snn_inference(snn_inference_program, tmp_path_factory):
    """The C++ example built against the installed package, its weights and its expected output."""
    sys.path.insert(0, str(CPP_EXAMPLE))
    from net import export
    data = tmp_path_factory.mktemp("weights")
    expected = export(data)
    return snn_inference_program, data, expected


def load_weights(snn_inference, tmp_path, weights: dict, damage=None):
    program, data, _ = snn_inference
    torch.save(weights, tmp_path / "weights.pt")
    if damage is not None:
        replace_record(tmp_path / "weights.pt", *damage)
    return run(program, tmp_path / "weights.pt", data / "input.pt", tmp_path / "out.pt")


def test_load_state_dict_loads_a_good_file(snn_inference, tmp_path):
    program, data, expected = snn_inference
    result = load_weights(snn_inference, tmp_path, torch.load(data / "weights.pt"))
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected)


@pytest.mark.parametrize("record", [b"", b"\0" * 12])  # an empty record and one shorter than fc.weight
def test_load_state_dict_refuses_a_short_record_naming_key_and_file(snn_inference, tmp_path, record):
    weights = torch.load(snn_inference[1] / "weights.pt")
    index = list(weights).index("fc.weight")  # torch.save numbers the storages in the dict's order
    result = load_weights(snn_inference, tmp_path, weights, damage=(index, record))
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert f"'fc.weight' in '{tmp_path / 'weights.pt'}': its record holds {len(record)} bytes" in result.stderr
    assert "needs 20480" in result.stderr and not (tmp_path / "out.pt").exists()


def test_load_state_dict_checks_dtypes_and_values(snn_inference, tmp_path):
    weights = torch.load(snn_inference[1] / "weights.pt")
    result = load_weights(snn_inference, tmp_path, {**weights, "fc.weight": weights["fc.weight"].long()})
    assert result.returncode == 1 and "'fc.weight' in" in result.stderr and "is Long but Float in the model" in result.stderr
    result = load_weights(snn_inference, tmp_path, {**weights, "fc.bias": 3})
    assert result.returncode == 1 and "'fc.bias' in" in result.stderr and "not a tensor" in result.stderr
    # float64 weights into a float32 model are converted, as nn.Module.load_state_dict does
    result = load_weights(snn_inference, tmp_path, {k: v.double() if v.is_floating_point() else v for k, v in weights.items()})
    assert result.returncode == 0, result.stderr
    (tmp_path / "weights.pt").write_bytes(b"PK\x03\x04 not really a zip")
    result = run(snn_inference[0], tmp_path / "weights.pt", snn_inference[1] / "input.pt", tmp_path / "out.pt")
    assert result.returncode == 1 and "cannot be read as a file written by torch.save" in result.stderr


# ---- the server against hostile clients ----

@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile")
    model = conv_bn_linear(directory / "model.pt")
    with start_server(directory / "model.pt", "--threads", 8, "--max-bytes", 1 << 20, "--timeout", 2,
                      log=directory / "log") as (process, port):
        yield model, process, port


def health_latency(port) -> float:
    start = time.perf_counter()
    status, _, _ = request(port, "GET", "/health", timeout=10)
    assert status == 200
    return time.perf_counter() - start


def test_chunked_body_past_the_limit_is_a_413_and_never_read_whole(hostile_server):
    _, process, port = hostile_server
    before = rss_kib(process.pid)
    answer = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nX-Shape: 50331648\r\nTransfer-Encoding: chunked\r\n\r\n")
        reader = threading.Thread(target=lambda: answer.append(read_until_closed(connection, 15)))
        reader.start()
        chunk, sent = b"%x\r\n" % (1 << 20) + b"\0" * (1 << 20) + b"\r\n", 0
        try:
            while sent < 192 << 20:  # 192 MB, 192 times the limit
                connection.sendall(chunk)
                sent += 1 << 20
        except OSError:
            pass
        reader.join()
    status, headers, body = parse_response(answer[0])
    assert_clean_error(status, headers, body, 413, "larger than this server accepts (1048576 bytes at most)")
    assert sent < 64 << 20, f"the server read {sent >> 20} MB of a body over a 1 MB limit"
    assert rss_kib(process.pid) - before < 32 * 1024
    assert health_latency(port) < 1


def test_compressed_bodies_are_refused_not_inflated(hostile_server):
    import gzip
    _, process, port = hostile_server
    bomb = gzip.compress(b"\0" * (128 << 20), compresslevel=9)  # about 127 KB, 128 MB inflated
    before = rss_kib(process.pid)
    for encoding in [b"Content-Encoding: gzip\r\nContent-Length: %d" % len(bomb),
                     b"Content-Encoding: deflate, gzip\r\nContent-Length: %d" % len(bomb),
                     b"Transfer-Encoding: gzip, chunked"]:
        body = bomb if b"Content-Length" in encoding else b"%x\r\n" % len(bomb) + bomb + b"\r\n0\r\n\r\n"
        raw = raw_exchange(port, b"POST /infer HTTP/1.1\r\nHost: x\r\nX-Shape: 33554432\r\n" + encoding + b"\r\n\r\n" + body)
        assert_clean_error(*parse_response(raw), 415)
    assert rss_kib(process.pid) - before < 32 * 1024
    # identity is no compression
    x = torch.randn(1, 1, 2, 6, 6)
    status, _, _ = request(port, "POST", "/infer", x.numpy().tobytes(), {"X-Shape": "1,1,2,6,6", "Content-Encoding": "identity"})
    assert status == 200


def test_broken_http_gets_a_4xx_and_the_server_goes_on(hostile_server):
    _, _, port = hostile_server
    cases = [
        (b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000000\r\n\r\n", 413),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64), 400),  # a TLS hello
        (b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST /infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST /infer HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\nContent-Length: 4\r\n\r\n", 417),
    ]
    for data, status in cases:
        assert_clean_error(*parse_response(raw_exchange(port, data)), status)
    # clients that vanish mid-body or before their answer
    for data in [b"POST /infer HTTP/1.1\r\nHost: x\r\nX-Shape: 1,1,2,6,6\r\nContent-Length: 288\r\n\r\n" + b"\0" * 100,
                 b"POST /infer HTTP/1.1\r\nHost: x\r\nX-Shape: 1,1,2,6,6\r\nContent-Length: 288\r\n\r\n" + b"\0" * 288]:
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(data)
    assert health_latency(port) < 1


def test_slow_clients_time_out_and_never_starve_health(hostile_server):
    """32 clients sending a header byte every 0.5 s: /health and inference answer within a second
    throughout, and the server closes the slow connections after --timeout (2 s)."""
    model, _, port = hostile_server
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
    request_line = b"POST /infer HTTP/1.1\r\nHost: x\r\nX-Shape: 1,1,2,6,6\r\n"
    closed_after = {}
    stop = threading.Event()

    def trickle():
        start = time.monotonic()
        for position in range(len(request_line)):
            for index, connection in enumerate(slow):
                if index in closed_after:
                    continue
                try:
                    connection.sendall(request_line[position:position + 1])
                except OSError:
                    closed_after[index] = time.monotonic() - start
            if stop.wait(0.5):
                return

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        latencies = []
        x = torch.randn(2, 1, 2, 6, 6)
        for _ in range(6):
            latencies.append(health_latency(port))
            start = time.perf_counter()
            status, _, body = infer(port, x, timeout=10)
            latencies.append(time.perf_counter() - start)
            assert status == 200
            torch.testing.assert_close(torch.frombuffer(bytearray(body), dtype=torch.float32).view(2, 1, 5), model(x))
            time.sleep(0.25)
        assert max(latencies) < 1, latencies
        # each slow connection is closed by the server once its 2 s are up
        for connection in slow:
            connection.settimeout(5)
            try:
                assert connection.recv(1024) == b""
            except ConnectionResetError:
                pass
    finally:
        stop.set()
        thread.join()
        for connection in slow:
            connection.close()


def test_idle_keep_alive_connections_are_closed_and_starve_nothing(hostile_server):
    _, _, port = hostile_server
    idle = []
    for _ in range(16):
        connection = socket.create_connection(("127.0.0.1", port), timeout=10)
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert connection.recv(4096).startswith(b"HTTP/1.1 200")
        idle.append(connection)
    opened = time.monotonic()
    try:
        assert max(health_latency(port) for _ in range(5)) < 1
        for connection in idle:  # closed after the 2 s timeout, not kept forever
            assert read_until_closed(connection, 6) == b""
        assert time.monotonic() - opened < 6
    finally:
        for connection in idle:
            connection.close()


def test_connections_past_the_limit_are_closed_at_once(tmp_path):
    conv_bn_linear(tmp_path / "model.pt")
    with start_server(tmp_path / "model.pt", "--max-connections", 4, "--timeout", 30) as (_, port):
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        time.sleep(0.2)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
                assert read_until_closed(extra, 5) == b""
        finally:
            for connection in held:
                connection.close()
        time.sleep(0.2)
        assert health_latency(port) < 1
