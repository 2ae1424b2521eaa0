"""The CPU kernels are built for several instruction sets and chosen at run time (cpu/dispatch.h):
every build is checked against float64 torch.nn on this machine (ATEN_CPU_CAPABILITY lowers the
choice, as it does torch's), and the library runs on CPUs without AVX2 or AVX-512 (qemu-user's
Nehalem and Haswell models: a single AVX-512 or AVX2 instruction on the way is a SIGILL)."""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECK = Path(__file__).resolve().parent / "capability_check.py"
ORDER = ["DEFAULT", "AVX2", "AVX512"]
QEMU = shutil.which("qemu-x86_64")


def run_check(command, env=None):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, **(env or {})))
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    capability, status = result.stdout.split()[:2]
    assert status == "ok"
    return capability


@pytest.mark.parametrize("capability", ORDER)
def test_each_build_matches_torch_nn(capability):
    best = torch.backends.cpu.get_cpu_capability()
    if best not in ORDER or ORDER.index(capability) > ORDER.index(best):
        pytest.skip(f"this CPU's best capability is {best}")
    ran = run_check([sys.executable, str(CHECK)], env={"ATEN_CPU_CAPABILITY": capability.lower()})
    assert ran == capability


@pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64", reason="qemu-user (Debian: qemu-user) is absent")
@pytest.mark.parametrize("cpu,capability", [("Nehalem", "DEFAULT"), ("Haswell", "AVX2")])
def test_runs_on_older_cpus(cpu, capability):
    assert run_check([QEMU, "-cpu", cpu, sys.executable, str(CHECK)]) == capability
