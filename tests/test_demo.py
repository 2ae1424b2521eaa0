"""The demo (the project's main job) runs and the C++ program prints the Python numbers."""

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "demo" / "demo.py"


def test_demo_runs_and_cpp_matches_python():
    result = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    python_lines = [line.split(": ", 1)[1] for line in lines if " Python: output " in line]
    cpp_lines = [line.split(": ", 1)[1] for line in lines if " C++: output " in line]
    assert len(python_lines) == 2 and python_lines == cpp_lines  # the MLP and the conv network
    assert all(line.endswith("max |difference| = 0") for line in lines if line.startswith("[3]"))
    served = [line for line in lines if line.startswith("[5] matterhorn_serve")]
    assert len(served) == 2 and all("HTTP 200" in line for line in served)
