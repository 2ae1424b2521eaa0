#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer (docs/SANITIZERS.md).
#
#   bash scripts/sanitize.sh              # build (build-sanitize/), then run everything below
#   bash scripts/sanitize.sh --dry-run    # print the build commands and the test lists, run nothing
#
# 1. Builds libmatterhorn, _C, matterhorn_run_model and matterhorn_serve with -DMATTERHORN_SANITIZE=ON
#    in build-sanitize/ and installs them in the wheel's layout (build-sanitize/install/matterhorn_pytorch,
#    with the Python sources linked in); builds examples/cpp/snn_inference with the same flags.
# 2. C++ programs: the run_model/example/serve checks of this script (good inputs against Python's
#    outputs, --threads, zero-size inputs, damaged files, good and bad HTTP requests; LeakSanitizer on),
#    then the test files that drive the programs (CPP_TESTS) against the sanitized binaries.
# 3. The op-level tests (PY_TESTS, the fuzzer included) in Python processes with the sanitized library.
# Exit status 1 when a sanitizer reported anything, a program crashed or a check or test failed.
# Needs the .venv of scripts/setup.sh; uses 2 build jobs (MATTERHORN_SANITIZE_JOBS to change).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() {
  sed -n '2,16s/^# \{0,1\}//p' "$0"
  cat <<EOF
Options:
  --dry-run       print the configure/build/install commands and the test lists; run nothing
  --skip-build    use the existing build-sanitize/ as it is
  --cpp-only      only step 2 (the C++ programs)
  --python-only   only step 3 (the op-level Python tests)
  -h, --help      this text
EOF
}

DRY_RUN=0 SKIP_BUILD=0 RUN_CPP=1 RUN_PY=1
for argument in "$@"; do
  case "$argument" in
    --dry-run) DRY_RUN=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --cpp-only) RUN_PY=0 ;;
    --python-only) RUN_CPP=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "sanitize.sh: unknown option '$argument'" >&2; usage >&2; exit 2 ;;
  esac
done

BUILD_DIR=build-sanitize
PREFIX=$ROOT/$BUILD_DIR/install
PACKAGE=$PREFIX/matterhorn_pytorch
LOGS=$ROOT/$BUILD_DIR/logs
WORK=$ROOT/$BUILD_DIR/work
PYTHON=$ROOT/.venv/bin/python
JOBS=${MATTERHORN_SANITIZE_JOBS:-2}
SANITIZE_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer"

# SKBUILD=2 gives the wheel's install layout (matterhorn_pytorch/{_C,lib,bin,share}), which the Python
# package and tests/conftest.py expect beside _C; a plain configure has no place for _C.
CONFIGURE=(.venv/bin/cmake -S . -B "$BUILD_DIR" -G Ninja -DMATTERHORN_SANITIZE=ON -DMATTERHORN_BUILD_PYTHON=ON
           -DSKBUILD=2 -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DPython_EXECUTABLE=$PYTHON"
           "-DCMAKE_MAKE_PROGRAM=$ROOT/.venv/bin/ninja")
BUILD=(.venv/bin/cmake --build "$BUILD_DIR" -j "$JOBS")
INSTALL=(.venv/bin/cmake --install "$BUILD_DIR" --prefix "$PREFIX")
EXAMPLE_CONFIGURE=(.venv/bin/cmake -S examples/cpp -B "$BUILD_DIR/example" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
                   "-DCMAKE_CXX_FLAGS=$SANITIZE_FLAGS" "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined"
                   "-DCMAKE_MAKE_PROGRAM=$ROOT/.venv/bin/ninja")
EXAMPLE_BUILD=(.venv/bin/cmake --build "$BUILD_DIR/example" -j "$JOBS")

# The test files run with the sanitized binaries (a listed file that does not exist is skipped).
CPP_TESTS=(tests/test_torchscript.py tests/test_tools_hostile.py tests/test_serve.py)
PY_TESTS=(tests/test_norm.py tests/test_layer_norm.py tests/test_linear.py tests/test_conv.py tests/test_step_modes.py
          tests/test_every_layer.py tests/test_cpp_modules.py tests/test_sync_batch_norm.py tests/test_reliability.py
          tests/test_fuzz.py)
existing() { for f in "$@"; do [[ -f $f ]] && printf '%s\n' "$f"; done; }
mapfile -t CPP_TESTS < <(existing "${CPP_TESTS[@]}")
mapfile -t PY_TESTS < <(existing "${PY_TESTS[@]}")

if (( DRY_RUN )); then
  printf 'configure: %s\n' "${CONFIGURE[*]}"
  printf 'build:     %s\n' "${BUILD[*]}"
  printf 'install:   %s\n' "${INSTALL[*]}"
  printf 'example:   %s\n' "${EXAMPLE_CONFIGURE[*]}"
  printf 'C++ program tests: %s\n' "${CPP_TESTS[*]}"
  printf 'op-level tests:    %s\n' "${PY_TESTS[*]}"
  exit 0
fi
[[ -x $PYTHON ]] || { echo "sanitize.sh: no $PYTHON: run scripts/setup.sh first" >&2; exit 2; }

START=$SECONDS
declare -a RESULTS=()
FAILED=0
# step NAME COMMAND...: runs it, records PASS/FAIL and the time.
step() {
  local name=$1 begin=$SECONDS status
  shift
  echo "=== $name"
  "$@" 2>&1 | tee "$WORK/steps/$(( ${#RESULTS[@]} + 1 )).out"
  status=${PIPESTATUS[0]}
  if (( status == 0 )); then RESULTS+=("PASS  $(printf '%5ds' $((SECONDS - begin)))  $name")
  else RESULTS+=("FAIL  $(printf '%5ds' $((SECONDS - begin)))  $name (exit $status)"); FAILED=1; fi
  return $status
}

# ---- 1. build ----
package_tree() {
  # The Python sources beside the sanitized binaries: the package imports from here, _C.__file__
  # points here, so lib/ and bin/ are the sanitized ones.
  local entry
  for entry in python/matterhorn_pytorch/*; do
    case "$(basename "$entry")" in *.in|__pycache__) continue ;; esac
    ln -sfn "$ROOT/$entry" "$PACKAGE/$(basename "$entry")"
  done
  # An editable install of the project puts scikit-build-core's redirecting finder first in
  # sys.meta_path, before PYTHONPATH: drop it, so that `import matterhorn_pytorch` is this copy.
  mkdir -p "$ROOT/$BUILD_DIR/pyshim"
  cat > "$ROOT/$BUILD_DIR/pyshim/sitecustomize.py" <<'EOF'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__name__.startswith("ScikitBuild")]
EOF
}
build() {
  local torch_prefix
  "${CONFIGURE[@]}" && "${BUILD[@]}" && "${INSTALL[@]}" >/dev/null && package_tree || return 1
  torch_prefix=$("$PYTHON" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)') || return 1
  "${EXAMPLE_CONFIGURE[@]}" "-DCMAKE_PREFIX_PATH=$torch_prefix;$PACKAGE/share/cmake" >/dev/null && "${EXAMPLE_BUILD[@]}"
}
rm -rf "$LOGS" "$WORK"
mkdir -p "$LOGS" "$WORK/steps"
if (( ! SKIP_BUILD )); then
  step "build (ASan+UBSan, -j$JOBS)" build || { printf '%s\n' "${RESULTS[@]}"; exit 1; }
fi

# ---- the sanitizers' run-time options ----
ASAN_LIB=$(gcc -print-file-name=libasan.so)
UBSAN_LIB=$(gcc -print-file-name=libubsan.so)
# Every process: a report ends it with exit status 66 and the summary prints it. ASan writes to
# $LOGS/asan.<pid> (also from children whose stderr a test captures); GCC's UBSan ignores log_path and
# writes to stderr, which every step keeps in $WORK/steps/ (pytest: --capture=sys, so that a report
# from the pytest process itself is not lost in its fd capture). allocator_may_return_null:
# an impossible allocation fails as it does without ASan (torch raises), not as an ASan abort.
ASAN_COMMON="halt_on_error=1:exitcode=66:log_path=$LOGS/asan:allocator_may_return_null=1:check_initialization_order=1:strict_init_order=1:detect_stack_use_after_return=1:suppressions=$ROOT/scripts/sanitize-asan.supp"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=66:suppressions=$ROOT/scripts/sanitize-ubsan.supp"
# The C++ programs: leaks checked at exit (LeakSanitizer).
CPP_ASAN_OPTIONS="$ASAN_COMMON:detect_leaks=1"
# Python: ASan's runtime must be loaded first, so it is preloaded; no leak check, because CPython and
# torch keep their interned objects, caches and op registries until exit by design.
PY_ASAN_OPTIONS="$ASAN_COMMON:detect_leaks=0"
PY_ENV=(env "LD_PRELOAD=$ASAN_LIB:$UBSAN_LIB" "ASAN_OPTIONS=$PY_ASAN_OPTIONS" "PYTHONPATH=$PREFIX:$ROOT/$BUILD_DIR/pyshim"
        "TORCHINDUCTOR_CACHE_DIR=$ROOT/$BUILD_DIR/inductor-cache" PYTHONDONTWRITEBYTECODE=1)

check_package() {
  "${PY_ENV[@]}" "$PYTHON" - "$PACKAGE" <<'EOF'
import sys
import matterhorn_pytorch as mth
maps = open("/proc/self/maps").read()
assert mth._C.__file__.startswith(sys.argv[1]), f"imported {mth._C.__file__}, not the sanitized build"
assert f"{sys.argv[1]}/lib/libmatterhorn.so" in maps and "libasan" in maps, "the sanitized libmatterhorn is not loaded"
print(f"matterhorn_pytorch {mth.__version__} from {mth._C.__file__}")
EOF
}
step "the sanitized package is the one imported" check_package || { printf '%s\n' "${RESULTS[@]}"; exit 1; }

# Positive controls: the library is instrumented, and a report under these options fails the process
# (exit 66) and lands in the log directory (here a separate one, so they do not count as findings).
controls() {
  local control=$WORK/control status
  mkdir -p "$control"
  nm -D --undefined-only "$PACKAGE/lib/libmatterhorn.so" | grep -q __asan_report_load \
    && nm -D --undefined-only "$PACKAGE/lib/libmatterhorn.so" | grep -q __ubsan_handle_ \
    || { echo "libmatterhorn.so is not instrumented"; return 1; }
  "${PY_ENV[@]}" "ASAN_OPTIONS=${PY_ASAN_OPTIONS//$LOGS/$control}" "$PYTHON" -c \
    'import ctypes; c = ctypes.CDLL(None); c.malloc.restype = ctypes.c_void_p; c.memset(ctypes.c_void_p(c.malloc(8)), 0, 16)' 2>/dev/null
  status=$?
  grep -qs heap-buffer-overflow "$control"/asan.* && (( status == 66 )) || { echo "ASan control: exit $status, no report"; return 1; }
  printf 'int main(int argc, char**) { volatile int zero = argc - 1; return 1 / zero; }\n' > "$control/ub.cpp"
  g++ $SANITIZE_FLAGS -o "$control/ub" "$control/ub.cpp" || return 1
  ASAN_OPTIONS=$CPP_ASAN_OPTIONS "$control/ub" 2> "$control/ubsan.out"
  status=$?
  grep -qs "runtime error: division by zero" "$control/ubsan.out" && (( status == 66 )) || { echo "UBSan control: exit $status, no report"; return 1; }
  echo "instrumented; ASan and UBSan reports are caught (exit 66, logged)"
}
step "positive controls" controls

pytest_run() {
  "${PY_ENV[@]}" "$PYTHON" -m pytest -q -p no:cacheprovider --capture=sys -W ignore::DeprecationWarning "$@"
}

# ---- 2. C++ programs ----
if (( RUN_CPP )); then
  cat > "$WORK/cpp_checks.py" <<'EOF'
"""The C++ programs on good and hostile input; each case must end without a crash or a sanitizer
report, good ones with Python's answer."""
import gzip, http.client, json, os, signal, socket, subprocess, sys, time, warnings, zipfile
from pathlib import Path

import torch
import matterhorn_pytorch as mth

ROOT, WORK, LOGS, EXAMPLE_BIN, CPP_ASAN = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples" / "cpp")]
from models import ConvBNLinear, MixedConvNet, NormNet  # noqa: E402
from net import export  # noqa: E402

BIN = Path(mth._C.__file__).parent / "bin"
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # the programs link ASan themselves
CHILD_ENV.update(ASAN_OPTIONS=CPP_ASAN, OMP_NUM_THREADS="2")
failures = []


def reports():
    return set(LOGS.iterdir())


def check(name, ok, detail=""):
    print(f"  {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(name)


def run(name, arguments, expect="any", timeout=300):
    """expect: 'ok' (exit 0), 'error' (exit 1 or 2, a message) or 'any' (no crash is all)."""
    before = reports()
    result = subprocess.run([str(a) for a in arguments], capture_output=True, text=True, env=CHILD_ENV, timeout=timeout)
    new = sorted(str(p) for p in reports() - before)
    message = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or [""])[0][:160]
    crashed = result.returncode < 0 or result.returncode == 66 or new
    wrong = (expect == "ok" and result.returncode != 0) or (expect == "error" and result.returncode not in (1, 2))
    check(name, not crashed and not wrong, f"exit {result.returncode}" + (f", reports {new}" if new else "") + f" | {message}")
    if crashed:
        print(result.stderr[-4000:], flush=True)  # UBSan's report is on stderr
    return result


def script(module, path, trace_input=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(module, trace_input) if trace_input is not None else torch.jit.script(module)
    scripted.save(str(path))
    return path


class Slice(torch.nn.Module):
    """A model that hands a zero-size slice of its input to `net`."""

    def __init__(self, net, dim: int):
        super().__init__()
        self.net, self.dim = net, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.narrow(self.dim, 0, 0))


def replace_record(path, data):
    """The torch.save file at `path` with its first storage record replaced by `data`."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, content in entries:
            archive.writestr(info, data if info.filename.endswith("/data/0") else content)
    return path


def trained(net, shape):
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(shape) * 2 + 1)
    return net.eval()


def save(tensor, name):
    torch.save(tensor, WORK / name)
    return WORK / name


# ---- matterhorn_run_model ----
print("matterhorn_run_model", flush=True)
models = {
    "conv_bn_linear": (trained(ConvBNLinear(), (4, 3, 2, 6, 6)), (3, 2, 2, 6, 6)),
    "norm_net": (trained(NormNet(), (4, 3, 2, 6, 6)), (3, 2, 2, 6, 6)),
    "mixed_conv": (trained(MixedConvNet(), (2, 2, 2, 8, 8)), (2, 3, 2, 8, 8)),
}
for name, (net, shape) in models.items():
    x = (torch.rand(shape) < 0.3).float()
    for kind in ("script", "trace"):
        path = script(net, WORK / f"{name}.{kind}.pt", x if kind == "trace" else None)
        out = WORK / f"{name}.{kind}.out.pt"
        run(f"run_model {name} ({kind})", [BIN / "matterhorn_run_model", path, save(x, f"{name}.x.pt"), out], "ok")
        if out.exists():
            close = torch.allclose(torch.load(out), net(x), rtol=1e-4, atol=1e-5)
            check(f"run_model {name} ({kind}) equals Python", close)
    run(f"run_model --threads 4 {name}", [BIN / "matterhorn_run_model", "--threads", "4", "--seconds", "2",
                                          WORK / f"{name}.script.pt", WORK / f"{name}.x.pt"], "ok")

conv_bn = WORK / "conv_bn_linear.script.pt"
good_x = WORK / "conv_bn_linear.x.pt"
for dim, label in [(0, "T=0"), (1, "B=0"), (3, "H=0"), (4, "W=0")]:  # zero sizes inside a model
    for name in ("conv_bn_linear", "norm_net"):
        path = script(Slice(models[name][0], dim), WORK / f"{name}.zero{dim}.pt")
        run(f"run_model {name} on {label}", [BIN / "matterhorn_run_model", path, WORK / f"{name}.x.pt"])
hostile_inputs = {
    "float64 input": save(torch.randn(3, 2, 2, 6, 6, dtype=torch.float64), "f64.pt"),
    "int64 input": save(torch.ones(3, 2, 2, 6, 6, dtype=torch.long), "i64.pt"),
    "wrong channels": save(torch.randn(3, 2, 3, 6, 6), "channels.pt"),
    "1-d input": save(torch.randn(7), "1d.pt"),
    "0-d input": save(torch.tensor(1.0), "0d.pt"),
    "zero-size input": save(torch.randn(3, 2, 2, 0, 6), "zero.pt"),
    "non-contiguous input": save(torch.randn(6, 6, 2, 2, 3).permute(4, 3, 2, 1, 0), "strided.pt"),
    "a dict, not a tensor": save({"x": torch.randn(2)}, "dict.pt"),
    "empty storage record": replace_record(save(torch.randn(3, 2, 2, 6, 6), "empty_record.pt"), b""),
    "short storage record": replace_record(save(torch.randn(3, 2, 2, 6, 6), "short_record.pt"), b"\0" * 12),
    "empty file": WORK / "empty.bin",
    "garbage file": WORK / "garbage.bin",
    "truncated file": WORK / "truncated.pt",
    "missing file": WORK / "missing.pt",
}
(WORK / "empty.bin").write_bytes(b"")
(WORK / "garbage.bin").write_bytes(os.urandom(4096))
(WORK / "truncated.pt").write_bytes(good_x.read_bytes()[: good_x.stat().st_size // 2])
for label, path in hostile_inputs.items():
    run(f"run_model input: {label}", [BIN / "matterhorn_run_model", conv_bn, path])
for label in ("empty file", "garbage file", "truncated file", "missing file"):
    run(f"run_model model: {label}", [BIN / "matterhorn_run_model", hostile_inputs[label], good_x], "error")
(WORK / "truncated_model.pt").write_bytes(conv_bn.read_bytes()[: conv_bn.stat().st_size // 2])
run("run_model model: truncated model", [BIN / "matterhorn_run_model", WORK / "truncated_model.pt", good_x], "error")
run("run_model output in a missing directory", [BIN / "matterhorn_run_model", conv_bn, good_x, WORK / "no" / "out.pt"])
for threads in ("0", "-1"):
    run(f"run_model --threads {threads}", [BIN / "matterhorn_run_model", "--threads", threads, "--seconds", "0.2", conv_bn, good_x])
run("run_model without arguments", [BIN / "matterhorn_run_model"], "error")

# ---- examples/cpp/snn_inference (matterhorn::load_state_dict), built with the sanitizers ----
print("snn_inference", flush=True)
data = WORK / "example"
expected = export(data)
files = [data / "weights.pt", data / "input.pt", data / "out.pt"]
run("snn_inference", [EXAMPLE_BIN, *files], "ok")
if files[2].exists():
    check("snn_inference equals Python", torch.allclose(torch.load(files[2]), expected, rtol=1e-4, atol=1e-5))
state = torch.load(files[0])
bad_weights = {
    "a wrong shape": {**state, "fc.weight": torch.zeros(3, 3)},
    "an extra key": {**state, "extra": torch.zeros(1)},
    "a missing key": {k: v for k, v in state.items() if k != "bn.bias"},
    "a zero-size weight": {**state, "fc.weight": torch.zeros(10, 0)},
}
for label, weights in bad_weights.items():
    torch.save(weights, data / "bad.pt")
    run(f"snn_inference weights with {label}", [EXAMPLE_BIN, data / "bad.pt", files[1], data / "bad_out.pt"], "error")
torch.save({k: v.double() if v.is_floating_point() else v for k, v in state.items()}, data / "f64.pt")
run("snn_inference float64 weights", [EXAMPLE_BIN, data / "f64.pt", files[1], data / "bad_out.pt"])
for label, record in (("an empty", b""), ("a short", b"\0" * 8)):
    torch.save(state, data / "bad.pt")
    replace_record(data / "bad.pt", record)
    run(f"snn_inference weights with {label} record", [EXAMPLE_BIN, data / "bad.pt", files[1], data / "bad_out.pt"], "error")
run("snn_inference garbage weights", [EXAMPLE_BIN, WORK / "garbage.bin", files[1], data / "bad_out.pt"], "error")
run("snn_inference garbage input", [EXAMPLE_BIN, files[0], WORK / "garbage.bin", data / "bad_out.pt"], "error")

# ---- matterhorn_serve ----
SERVE = BIN / "matterhorn_serve"
if SERVE.exists():
    print("matterhorn_serve", flush=True)
    net = models["conv_bn_linear"][0]
    before = reports()
    server = subprocess.Popen([str(SERVE), str(conv_bn), "--port", "0", "--threads", "2", "--max-bytes", str(1 << 20)],
                              stdout=subprocess.PIPE, stderr=open(WORK / "serve.log", "w"), text=True, env=CHILD_ENV)
    line = server.stdout.readline()
    check("serve starts", line.startswith("listening on"), line.strip())
    port = int(line.rsplit(":", 1)[1]) if line.startswith("listening on") else 0

    def exchange(raw, timeout=20):
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
            received = b""
            try:
                connection.sendall(raw)
            except (BrokenPipeError, ConnectionResetError):  # answered and closed before the whole body
                pass
            try:
                while chunk := connection.recv(65536):
                    received += chunk
            except (socket.timeout, ConnectionResetError):
                pass
        return int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.") else None

    def post(body, headers, extra=b""):
        head = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())
        return exchange(b"POST /infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head + extra
                        + (b"Content-Length: %d\r\n" % len(body) if b"chunked" not in extra else b"") + b"\r\n" + body)

    if port:
        x = torch.randn(3, 2, 2, 6, 6)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/infer", x.numpy().tobytes(), {"X-Shape": "3,2,2,6,6", "X-Dtype": "float32"})
        response = connection.getresponse()
        body = response.read()
        good = response.status == 200 and torch.allclose(
            torch.frombuffer(bytearray(body), dtype=torch.float32).view(3, 2, 5), net(x), rtol=1e-4, atol=1e-5)
        check("serve: a good request equals Python", good, f"status {response.status}")
        connection.close()
        raw = x.numpy().tobytes()
        bad = {
            "short body": post(raw[:-4], {"X-Shape": "3,2,2,6,6"}),
            "float64": post(raw, {"X-Shape": "3,2,2,6,6", "X-Dtype": "float64"}),
            "X-Shape 3,x,2": post(raw, {"X-Shape": "3,x,2"}),
            "no X-Shape": post(raw, {}),
            "wrong channels": post(torch.randn(3, 2, 3, 6, 6).numpy().tobytes(), {"X-Shape": "3,2,3,6,6"}),
            "impossible shape": post(b"", {"X-Shape": "0,1099511627776,1099511627776,1099511627776"}),
            "body over --max-bytes": post(b"\0" * (2 << 20), {"X-Shape": str(1 << 19)}),
            "chunked body over the limit": post((b"%x\r\n" % (1 << 19) + b"\0" * (1 << 19) + b"\r\n") * 3 + b"0\r\n\r\n",
                                                {"X-Shape": str(3 << 17)}, b"Transfer-Encoding: chunked\r\n"),
            "gzip body": post(gzip.compress(b"\0" * (4 << 20)), {"X-Shape": str(1 << 20)}, b"Content-Encoding: gzip\r\n"),
            "control characters in a header": post(raw, {"X-Shape": "3,2\x01,2"}),
            "not HTTP": exchange(b"\x00\xff GARBAGE \r\n\r\n"),
            "unknown path": exchange(b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        }
        for label, status in bad.items():
            check(f"serve: {label} -> 4xx", status is not None and 400 <= status < 500, f"status {status}")
        for label, shape in [("1,1,2,0,8", "1,1,2,0,8"), ("T=0", "0,2,2,6,6"), ("B=0", "3,0,2,6,6")]:
            status = post(b"", {"X-Shape": shape})  # torch.nn answers an empty tensor or refuses the shape
            check(f"serve: zero-size {label}, empty body -> 200 or 4xx", status is not None and status < 500, f"status {status}")
        check("serve: /health after all", exchange(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") == 200)
    server.send_signal(signal.SIGTERM)
    status = server.wait(timeout=60)
    new = sorted(str(p) for p in reports() - before)
    check("serve ends on SIGTERM without a report", status in (0, -signal.SIGTERM) and not new,
          f"exit {status}" + (f", reports {new}" if new else ""))

print(f"{len(failures)} failed: {failures}" if failures else "all C++ program checks passed")
sys.exit(1 if failures else 0)
EOF
  step "C++ programs: run_model, snn_inference, serve (LeakSanitizer on)" \
    "${PY_ENV[@]}" "$PYTHON" "$WORK/cpp_checks.py" "$ROOT" "$WORK" "$LOGS" "$ROOT/$BUILD_DIR/example/snn_inference" "$CPP_ASAN_OPTIONS"
  (( ${#CPP_TESTS[@]} )) && step "C++ programs: ${CPP_TESTS[*]}" pytest_run "${CPP_TESTS[@]}"
fi

# ---- 3. op-level tests ----
if (( RUN_PY )); then
  for test in "${PY_TESTS[@]}"; do
    step "$test" pytest_run "$test"
  done
fi

# ---- summary ----
mapfile -t REPORTS < <(find "$LOGS" -type f | sort)
mapfile -t UB < <(cat "$WORK"/steps/*.out 2>/dev/null | grep -a "runtime error:" | sort | uniq -c)
echo
echo "=== UBSan reports: ${#UB[@]}"
(( ${#UB[@]} )) && printf '%s\n' "${UB[@]}" && echo "(stacks: grep -A12 'runtime error:' $WORK/steps/*.out)"
echo "=== ASan/LSan reports: ${#REPORTS[@]}"
for report in "${REPORTS[@]}"; do
  echo "--- $report"
  grep -m1 -E 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' "$report"
  grep -E '^ *#[0-9]+ ' "$report" | head -12
done
echo
echo "=== summary ($(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s)"
printf '%s\n' "${RESULTS[@]}"
if (( FAILED || ${#REPORTS[@]} || ${#UB[@]} )); then
  echo "NOT CLEAN: ${#REPORTS[@]} ASan/LSan and ${#UB[@]} UBSan report(s); failed steps above"
  exit 1
fi
echo "CLEAN: no sanitizer report, every step passed"
