"""C++ users: find_package(matterhorn) against the pip-installed package and a plain
`cmake --install`; a program built with the C++ API loads Python-saved weights and reproduces
the Python output; one loaded model run by 8 threads at once."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import matterhorn_pytorch as mth
from conftest import CPP_EXAMPLE, REPO, RUN_MODEL, build_example, build_folder, cmake

sys.path.insert(0, str(CPP_EXAMPLE))
from net import Net, export  # noqa: E402

def run_example(program: Path, tmp_path: Path):
    expected = export(tmp_path / "data")
    result = subprocess.run([str(program), *(str(tmp_path / "data" / f) for f in ("weights.pt", "input.pt", "out.pt"))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(tmp_path / "data" / "out.pt"), expected)


def test_example_against_the_pip_installed_package(snn_inference_program, tmp_path):
    assert (Path(mth.cmake_prefix_path) / "matterhorn" / "matterhornConfig.cmake").is_file()
    run_example(snn_inference_program, tmp_path)


def test_example_against_a_plain_cmake_install(tmp_path):
    # A plain (non-Python) build of the library.
    prefix = tmp_path / "prefix"
    with build_folder("plain") as build_dir:
        cmake("-S", REPO, "-B", build_dir, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
              f"-DPython_EXECUTABLE={sys.executable}", "-DMATTERHORN_BUILD_TOOLS=OFF",
              "-DMATTERHORN_CPU_CAPABILITIES=DEFAULT")  # the package is under test, not the kernels: one build of them
        cmake("--build", build_dir)
        cmake("--install", build_dir, "--prefix", prefix)
    assert (prefix / "lib" / "cmake" / "matterhorn" / "matterhornConfig.cmake").is_file()
    assert not (prefix / "lib" / "cmake" / "matterhorn" / "_C").exists()
    run_example(build_example(str(prefix), tmp_path / "build"), tmp_path)


def test_load_state_dict_rejects_a_mismatched_file(snn_inference_program, tmp_path):
    program = snn_inference_program
    export(tmp_path / "data")
    state = torch.load(tmp_path / "data" / "weights.pt")

    def load_in_cpp(weights):
        torch.save(weights, tmp_path / "data" / "weights.pt")
        files = (str(tmp_path / "data" / f) for f in ("weights.pt", "input.pt", "out.pt"))
        result = subprocess.run([str(program), *files], capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        return result.stderr

    assert "'fc.weight' has shape [3, 3] in the file but [10, 512] in the model" in load_in_cpp(
        {**state, "fc.weight": torch.zeros(3, 3)})
    assert "unexpected key 'extra'" in load_in_cpp({**state, "extra": torch.zeros(1)})
    assert "lacks 1 key(s), the first 'bn.bias'" in load_in_cpp({k: v for k, v in state.items() if k != "bn.bias"})
    # what torch.save(model.state_dict()) writes (an OrderedDict) is refused with the way out
    assert "matterhorn_pytorch.save_state_dict(model, path)" in load_in_cpp(Net().state_dict())


def test_eight_threads_share_one_loaded_model(tmp_path):
    net = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(net.eval()).save(str(tmp_path / "net.pt"))
    torch.save((torch.rand(4, 3, 2, 8, 8) < 0.2).float(), tmp_path / "input.pt")
    result = subprocess.run([str(RUN_MODEL), "--threads", "8", "--seconds", "2", str(tmp_path / "net.pt"),
                             str(tmp_path / "input.pt")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 mismatches" in result.stdout and "8 threads" in result.stdout
