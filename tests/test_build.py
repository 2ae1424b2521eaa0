"""Build information and the import-time check against the running torch."""

import pathlib
import re
import subprocess

import pytest
import torch

import matterhorn_pytorch as mth
from matterhorn_pytorch import _build_config
from matterhorn_pytorch._loader import check_torch_version


def test_build_info_matches_the_running_torch():
    info = mth._C.build_info()
    assert info["torch_version"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    assert info["torch_version"] == _build_config.TORCH_VERSION
    assert info["with_cuda"] == _build_config.WITH_CUDA
    assert info["version"] == mth.__version__


def test_the_ops_are_registered_with_the_dispatcher():
    assert torch.ops.matterhorn.linear.default._schema.name == "matterhorn::linear"


@pytest.mark.parametrize("built,running", [("2.12.0", "2.13.0+cpu"), ("2.13.0", "3.13.0"), ("2.13.1", "2.1.3")])
def test_a_different_torch_minor_fails_with_a_clear_message(built, running):
    with pytest.raises(ImportError, match=re.escape(f"built against torch {built} but torch {running} is running")):
        check_torch_version(built, running)


def test_same_minor_with_other_patch_or_local_version_is_accepted():
    check_torch_version("2.13.0", "2.13.1+cu130")


def needed_libraries(path):
    """The DT_NEEDED entries of a shared library."""
    out = subprocess.run(["readelf", "-d", str(path)], check=True, capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def test_cpu_kernels_share_torchs_openmp_runtime():
    # at::parallel_for is an inline `omp parallel` in torch's OpenMP builds: a library built without
    # OpenMP runs its kernels on one thread, whatever torch.set_num_threads says
    torch_lib = pathlib.Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    ours = pathlib.Path(mth._C.__file__).parent / "lib" / "libmatterhorn.so"  # beside _C, also when editable
    torch_openmp = [name for name in needed_libraries(torch_lib) if "omp" in name]
    assert torch_openmp, "this torch is not an OpenMP build: the check does not apply"
    assert set(torch_openmp) <= set(needed_libraries(ours))
