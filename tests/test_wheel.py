"""The wheel `pip wheel --no-build-isolation .` makes: its binaries depend on torch's libraries and
on what the manylinux policy allows, nothing else (auditwheel and the ELF NEEDED entries say so),
and it installs into a fresh virtual environment that has only torch, where the layers, the
C++ programs and the server start."""

import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# torch's own libraries (libgomp is the OpenMP runtime torch ships in torch/lib), our library,
# and the system libraries of the manylinux policy that our binaries use.
ALLOWED = re.compile(r"^(libtorch(_cpu|_cuda)?\.so|libc10(_cuda)?\.so|libgomp\.so\.1|libmatterhorn\.so|"
                     r"libc\.so\.6|libm\.so\.6|libstdc\+\+\.so\.6|libgcc_s\.so\.1|ld-linux-x86-64\.so\.2|"
                     r"libpthread\.so\.0|libdl\.so\.2|librt\.so\.1)$")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheelhouse")
    # the editable install's build dir is reused: this links and packs, it does not recompile
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, timeout=900)
    (path,) = out.glob("matterhorn_pytorch-*.whl")
    return path


def test_auditwheel_finds_only_torch_and_policy_libraries(wheel, tmp_path):
    report = subprocess.run([str(BIN / "auditwheel"), "show", str(wheel)], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    text = " ".join((report.stdout + report.stderr).split())
    assert 'consistent with the following platform tag' in text
    for foreign in ("httplib", "libssl", "libcrypto", "brotli", "libz.so"):
        assert foreign not in text, text
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path)
    binaries = [p for p in (tmp_path / "matterhorn_pytorch").rglob("*")
                if p.is_file() and p.read_bytes()[:4] == b"\x7fELF"]
    assert {p.name for p in binaries} >= {"libmatterhorn.so", "matterhorn_run_model", "matterhorn_serve"}
    for binary in binaries:
        dynamic = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
        assert needed, binary
        assert all(ALLOWED.match(name) for name in needed), (binary.name, needed)


SMOKE = textwrap.dedent("""
    import subprocess, sys, tempfile, warnings
    from pathlib import Path
    import torch, torch.nn as nn
    import matterhorn_pytorch as mth
    torch.manual_seed(0)
    x = torch.rand(4, 2, 3, 8, 8).bernoulli()
    net = nn.Sequential(mth.snn.Conv2d(3, 4, 3, padding=1), mth.snn.BatchNorm2d(4), mth.snn.LayerNorm([4, 8, 8]))
    twin = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LayerNorm([4, 8, 8]))
    twin.load_state_dict(net.state_dict())
    torch.testing.assert_close(net(x), twin(x.flatten(0, 1)).unflatten(0, (4, 2)))
    binaries = Path(mth._C.__file__).parent / "bin"
    net.eval()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(net).save(f"{folder}/net.pt")
        torch.save(x, f"{folder}/x.pt")
        run = subprocess.run([str(binaries / "matterhorn_run_model"), f"{folder}/net.pt", f"{folder}/x.pt",
                              f"{folder}/y.pt"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        torch.testing.assert_close(torch.load(f"{folder}/y.pt"), net(x))
    serve = subprocess.run([str(binaries / "matterhorn_serve"), "--help"], capture_output=True, text=True)
    assert serve.returncode == 0 and "usage" in (serve.stdout + serve.stderr).lower(), serve
    print("smoke ok", mth.__version__, mth._C.cpu_capability())
""")


def test_ships_py_typed_so_type_checkers_read_the_signatures(wheel):
    assert "matterhorn_pytorch/py.typed" in zipfile.ZipFile(wheel).namelist()


def test_installs_and_runs_in_a_fresh_environment_with_only_torch(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True, capture_output=True, timeout=600)
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=300)
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout
    assert "pybind11" not in listed and "numpy" not in listed.lower()  # only torch and its own requirements
    smoke = subprocess.run([str(venv / "bin" / "python"), "-c", SMOKE], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "smoke ok" in smoke.stdout
