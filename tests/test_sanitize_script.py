"""scripts/sanitize.sh (docs/SANITIZERS.md) without its sanitized build, which takes too long for
the suite: its dry run names a sanitized build in its own directory and test files that exist,
its options are checked, and every suppression carries its reason."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "sanitize.sh"


def sanitize(*arguments):
    return subprocess.run(["bash", str(SCRIPT), *arguments], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_dry_run_names_the_sanitized_build_and_existing_tests():
    result = sanitize("--dry-run")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    configure = lines["configure"].split()
    assert {"-DMATTERHORN_SANITIZE=ON", "-DMATTERHORN_BUILD_PYTHON=ON", "-DCMAKE_BUILD_TYPE=RelWithDebInfo"} <= set(configure)
    assert configure[configure.index("-B") + 1] == "build-sanitize" and "Ninja" in configure
    assert lines["build"].split()[-2:] == ["-j", "2"]  # 2 cores: at most 2 compilers of ~1 GB each
    assert "-fsanitize=address,undefined" in lines["example"]
    tests = lines["op-level tests"].split() + lines["C++ program tests"].split()
    assert {"tests/test_norm.py", "tests/test_layer_norm.py", "tests/test_linear.py", "tests/test_conv.py"} <= set(tests)
    assert all((ROOT / test).is_file() for test in tests)
    # the option the script relies on
    assert re.search(r"option\(MATTERHORN_SANITIZE\b", (ROOT / "CMakeLists.txt").read_text())


def test_help_and_unknown_options():
    result = sanitize("--help")
    assert result.returncode == 0 and "--dry-run" in result.stdout and "--skip-build" in result.stdout
    result = sanitize("--fast")
    assert result.returncode == 2 and "unknown option '--fast'" in result.stderr


def test_every_suppression_has_a_reason_above_it():
    files = sorted((ROOT / "scripts").glob("sanitize*.supp"))
    assert files
    for path in files:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if line.strip() and not line.startswith("#"):
                assert ":" in line, f"{path.name}:{number + 1}: not a suppression: {line!r}"
                assert number > 0 and lines[number - 1].startswith("# "), f"{path.name}:{number + 1}: no reason above {line!r}"
