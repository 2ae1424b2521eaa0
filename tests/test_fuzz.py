"""The fuzzer: each property of tests/test_fuzz_cases.py runs in its own child process,
so that a crash (SIGSEGV, SIGFPE, abort) fails that test instead of killing the run, with the
case that crashed printed. Budget: the "ci" Hypothesis profile (bounded, derandomized); the long
run is `MATTERHORN_FUZZ=long .venv/bin/python -m pytest tests/test_fuzz.py` (docs/TESTING.md)."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import matterhorn_pytorch as mth

HERE = Path(__file__).resolve().parent
CASES = HERE / "test_fuzz_cases.py"
PROPERTIES = sorted(re.findall(r"^def (test_\w+)\(data\)", CASES.read_text(), re.M))
TIMEOUT = 3600 if os.environ.get("MATTERHORN_FUZZ") == "long" else 300


@pytest.mark.parametrize("name", PROPERTIES)
def test_fuzz(name, tmp_path):
    last_case = tmp_path / "last_case.txt"
    env = dict(os.environ, MATTERHORN_FUZZ_CHILD="1", MATTERHORN_FUZZ_LAST_CASE=str(last_case),
               PYTHONFAULTHANDLER="1")
    # -s: Hypothesis' statistics for the count of cases; -p no:cacheprovider: nothing written to the tree
    command = [sys.executable, "-m", "pytest", f"{CASES}::{name}", "-q", "-s", "-p", "no:cacheprovider",
               "--hypothesis-show-statistics", "-W", "ignore"]
    result = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    output = result.stdout + result.stderr
    cases = re.findall(r"(\d+) passing, (\d+) failing, and (\d+) invalid", output)
    print(f"{name}: {sum(int(p) + int(f) for p, f, _ in cases)} cases ({os.environ.get('MATTERHORN_FUZZ', 'ci')})")
    if result.returncode < 0:  # killed by a signal: the falsifying case is the last one recorded
        crashed = last_case.read_text() if last_case.exists() else "(no case recorded)"
        pytest.fail(f"{name} crashed with {signal.Signals(-result.returncode).name} on:\n{crashed}\n\n"
                    f"{output[-6000:]}", pytrace=False)
    assert result.returncode == 0, f"{name} failed (exit {result.returncode}):\n{output[-12000:]}"
    assert cases, f"{name}: no Hypothesis run reported:\n{output[-3000:]}"  # the child did run cases


def test_every_public_op_and_layer_is_fuzzed():
    """A new op or layer fails here until it has a case."""
    import test_fuzz_cases as cases  # noqa: PLC0415 - needs nothing but the import
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("matterhorn::")}
    assert registered == set(cases.FUZZED_OPS), f"ops without a fuzz case: {registered - set(cases.FUZZED_OPS)}"
    layers = {n for n, c in vars(mth.snn).items()
              if isinstance(c, type) and issubclass(c, mth.snn.Module) and c not in (mth.snn.Module, mth.snn.Synapse)}
    assert layers == set(cases.FUZZED_LAYERS), f"layers without a fuzz case: {layers - set(cases.FUZZED_LAYERS)}"
    assert set(cases.FUZZED_OPS.values()) | set(cases.FUZZED_LAYERS.values()) <= {
        getattr(cases, n) for n in PROPERTIES}
