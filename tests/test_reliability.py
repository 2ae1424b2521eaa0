"""Inputs that crash the process or give wrong answers where a check is missing
(tests/reliability_cases.py). The cases run in one child process; a signal there fails the case
that was running and every case after it, and the test run goes on."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import reliability_cases

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def outcomes():
    child = subprocess.run([sys.executable, str(HERE / "reliability_cases.py")], capture_output=True, text=True,
                           timeout=600, cwd=HERE)
    results, running = {}, None
    for line in child.stdout.splitlines():
        record = json.loads(line)
        if record["status"] == "started":
            running = record["case"]
        else:
            results[record["case"]] = record
            running = None
    if running is not None:
        results[running] = {"status": "crashed", "error": f"exit code {child.returncode}: {child.stderr[-2000:]}"}
    return results, child


@pytest.mark.parametrize("name", list(reliability_cases.CASES))
def test_case(outcomes, name):
    results, child = outcomes
    assert name in results, f"not reached: the child exited with {child.returncode} before it"
    assert results[name]["status"] == "ok", results[name]["error"]
