"""Tools read the layers' signatures without running code: mypy (PyPI) checks a user's script that
builds and calls every layer, and reports a misspelled keyword in another one."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import matterhorn_pytorch as mth

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "typecheck"

LAYERS = sorted(name for name in mth.snn.__all__
                if inspect.isclass(getattr(mth.snn, name)) and issubclass(getattr(mth.snn, name), mth.snn.Synapse)
                and name != "Synapse")


def mypy(script: Path, cache: Path) -> subprocess.CompletedProcess:
    # The source tree on MYPYPATH: the editable install's import hook is invisible to mypy.
    environment = dict(os.environ, MYPYPATH=str(ROOT / "python"))
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), "--no-error-summary",
                           "--hide-error-context", str(script)],
                          capture_output=True, text=True, env=environment, timeout=600)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mypy-cache")  # shared: torch is analysed once


def test_every_layer_has_its_parameters_in_its_init():
    for name in LAYERS:
        parameters = inspect.signature(getattr(mth.snn, name).__init__).parameters
        assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters.values()), name
        assert "batch_first" in parameters, name


def test_the_user_script_builds_and_calls_every_layer():
    source = (SCRIPTS / "every_layer.py").read_text()
    assert [name for name in LAYERS if f"mth.snn.{name}(" not in source] == []


def test_mypy_accepts_a_script_that_uses_every_layer(cache):
    result = mypy(SCRIPTS / "every_layer.py", cache)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_reports_a_misspelled_keyword(cache):
    result = mypy(SCRIPTS / "misspelled_keyword.py", cache)
    assert result.returncode == 1
    assert 'Unexpected keyword argument "kernel_sise" for "Conv2d"' in result.stdout, result.stdout


def test_the_package_says_it_is_typed():
    assert (Path(mth.__file__).parent / "py.typed").is_file()
