"""The GPU machine's one command (scripts/gpu_check.sh) and its benchmark, checked here on the CPU
so that the short device time goes to measuring, not to fixing the scripts."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_benchmark_runs_every_case_in_its_smoke_mode():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--smoke"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    table = lines.index(next(line for line in lines if line.startswith("| case (fwd+bwd)")))
    rows = [line for line in lines[table + 2:] if line.startswith("| ")]  # the last table
    labels = [case.label for case in load_bench().CASES]
    assert [row.split(" | ")[0][2:] for row in rows] == labels
    for row in rows:
        ours, torch_ms, ratio = (float(cell) for cell in row.split(" | ")[1:4])
        assert ours > 0 and torch_ms > 0 and ratio > 0
    # before it, our BatchNorm step op by op (kernel by kernel on a GPU), each pass with its speed
    breakdown = [line.split(" | ") for line in lines[:table] if line.startswith("| matterhorn::")]
    assert sorted({cells[0][2:] for cells in breakdown}) == sorted(
        name for name in load_bench().PASSES if name.startswith("matterhorn::"))
    assert len(breakdown) == 8 and all(float(cells[1]) > 0 and cells[3].endswith("% |") for cells in breakdown)


def test_goals_are_judged_from_ratio_and_floor_share():
    bench = load_bench()
    case = bench.Case("bn", None, None, (1,), max_ratio=1 / 3.5, min_floor_share=0.8, passes=8)
    assert bench.goal_text(case, 0.25, 0.85).endswith(": met")
    assert bench.goal_text(case, 0.30, 0.85).endswith(": MISSED")
    assert bench.goal_text(case, 0.25, 0.79).endswith(": MISSED")
    assert bench.goal_text(bench.Case("ln", None, None, (1,), passes=5), 1.0, 0.1) == ""


def test_the_gpu_check_script_parses_and_refuses_a_machine_without_a_gpu(tmp_path):
    script = ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path)})
    assert result.returncode != 0 and "no CUDA GPU" in result.stderr + result.stdout


FAKE_PYTHON = """#!/bin/bash
# stands in for a GPU machine's python: the build and imports succeed, pytest exits with
# $FAKE_PYTEST_STATUS, the benchmark prints a table
case "$1" in
  -m) [ "$2" = pytest ] && { echo "tests ran"; exit "$FAKE_PYTEST_STATUS"; }; exit 0 ;;
  bench/bench_gpu.py) echo "| the bench table |"; exit 0 ;;
  *) echo fake; exit 0 ;;
esac
"""


@pytest.mark.parametrize("pytest_status", [0, 1])
def test_a_failing_cuda_test_fails_the_gpu_check_after_the_table(tmp_path, pytest_status):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "OUT": str(out),
                                 "FAKE_PYTEST_STATUS": str(pytest_status)})
    assert "| the bench table |" in result.stdout and "tests ran" in result.stdout
    assert (result.returncode != 0) == (pytest_status != 0), result.stdout + result.stderr


def test_the_cuda_tests_pass_on_the_cpu():
    """tests/test_cuda.py's own code (references, tolerances, shapes) is right where our CPU kernels run."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_cuda.py")],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env=dict(os.environ, MATTERHORN_TEST_DEVICE="cpu"))
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
