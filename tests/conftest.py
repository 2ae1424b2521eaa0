import os
import subprocess
from pathlib import Path

import pytest
import torch

import matterhorn_pytorch as mth

# Compiled files live beside _C (editable installs serve only the .py files from the source tree).
PACKAGE_BINARY_DIR = Path(mth._C.__file__).resolve().parent
RUN_MODEL = PACKAGE_BINARY_DIR / "bin" / "matterhorn_run_model"

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
