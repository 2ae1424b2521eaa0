import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils
from filelock import FileLock

import matterhorn_pytorch as mth

# Compiled files live beside _C (editable installs serve only the .py files from the source tree).
PACKAGE_BINARY_DIR = Path(mth._C.__file__).resolve().parent
RUN_MODEL = PACKAGE_BINARY_DIR / "bin" / "matterhorn_run_model"
REPO = Path(__file__).resolve().parent.parent
CPP_EXAMPLE = REPO / "examples" / "cpp"
CMAKE = str(Path(sys.executable).parent / "cmake")  # the venv's CMake (>= 3.26)

# torch.compile caches compiled graphs across runs; ours call our ops, whose schemas can change
# between builds: one cache per build of libmatterhorn.
_library = next((PACKAGE_BINARY_DIR / "lib").glob("libmatterhorn.so*")).stat()
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    str(Path(__file__).resolve().parent.parent / "build" / f"inductor-cache-{_library.st_mtime_ns}-{_library.st_size}"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_model_in_cpp(model_path: Path, input: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Run a TorchScript file with matterhorn_run_model (LibTorch + libmatterhorn, no Python)."""
    input_path, output_path = tmp_path / "input.pt", tmp_path / "output.pt"
    torch.save(input, input_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(RUN_MODEL), str(model_path), str(input_path), str(output_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return torch.load(output_path)


def cmake(*args, cwd=REPO):
    result = subprocess.run([CMAKE, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=1800,
                            env=dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="2"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@contextlib.contextmanager
def build_folder(name: str):
    """A folder under build/ kept between runs (its builds are incremental), held by one pytest
    worker at a time."""
    folder = REPO / "build" / name
    folder.parent.mkdir(exist_ok=True)
    with FileLock(f"{folder}.lock"):
        yield folder


def build_example(prefix_path: str, build_dir: Path) -> Path:
    """examples/cpp's snn_inference, built against the matterhorn CMake package under prefix_path."""
    cmake("-S", CPP_EXAMPLE, "-B", build_dir, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
          f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{prefix_path}")
    cmake("--build", build_dir)
    return build_dir / "snn_inference"


@pytest.fixture(scope="session")
def snn_inference_program() -> Path:
    """examples/cpp's snn_inference built against the pip-installed package."""
    with build_folder("example") as folder:
        return build_example(mth.cmake_prefix_path, folder)
