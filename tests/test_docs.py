"""Every shell and Python block of README.md and docs/*.md runs as pasted, in order per file, on a
machine set up by the README's first command (`bash scripts/demo.sh`: `.venv` and `demo_out/`).

Shell blocks (```bash, ```sh) run with `bash -euo pipefail` in the repository root, Python blocks
(```python) with `.venv/bin/python`, each in its own process group, bounded in time; whatever a
block leaves running (a server started with `&`) is killed after it. A bench script that takes
`--quick` runs with it. Blocks of another language (```text) are not run: the prose beside them
says why.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
DOCUMENTS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
RUN = {"bash": "shell", "sh": "shell", "python": "python"}
NOT_RUN = {"text", "console", "cmake", "cpp", "json", "toml"}
BLOCK_SECONDS = 240

# Commands not run here, by design: each sets up the machine, runs a whole suite (which this test
# is part of) or builds the library again (minutes), or needs a GPU. A block is skipped only when
# every command in it matches one of these (at its start, after any VAR=value assignments).
SKIPPED = {
    r"bash scripts/demo\.sh\b": "the whole setup and the demo; this test runs after it (its parts: tests/test_demo.py)",
    r"bash scripts/test\.sh\b": "the whole setup and test suite, this test included",
    r"bash scripts/gpu_check\.sh\b": "needs a GPU; its parts run without one in tests/test_gpu_scripts.py",
    r"bash scripts/sanitize\.sh\b": "a sanitizer build of the library (minutes) and its own run of the tests",
    r"\.venv/bin/cmake (-S \. -B|--build|--install) build-sanitize\b": "the sanitizer build that scripts/sanitize.sh runs",
}

FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
BENCH = re.compile(r"^((?:[A-Z_]+=\S+ )*\.venv/bin/python (bench/bench_\w+\.py))(?=\s*(#.*)?$)", re.MULTILINE)


def blocks(path):
    """(line, language, text) of each fenced block of a Markdown file, in order."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def commands(shell_text):
    """The block's command lines without comments and continuation lines' joins."""
    joined = shell_text.replace("\\\n", " ")
    lines = (line.split(" #", 1)[0].strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def skipped(command):
    """The reason a command is skipped (options and leading VAR=value assignments aside), or None."""
    command = re.sub(r"^([A-Za-z_][A-Za-z0-9_]*=\S*\s+)*", "", command)
    return next((reason for pattern, reason in SKIPPED.items() if re.match(pattern, command)), None)


def skip_reason(language, text):
    if RUN.get(language) != "shell":
        return None
    listed = [skipped(command) for command in commands(text)]
    if listed and all(listed):
        return "; ".join(dict.fromkeys(listed))
    assert not any(listed), f"a block mixes skipped and run commands: {commands(text)}"
    return None


def with_quick(shell_text):
    """`.venv/bin/python bench/X.py` with no arguments gets `--quick` where X.py takes it."""
    def quick(match):
        takes_quick = "--quick" in (ROOT / match.group(2)).read_text()
        return match.group(1) + (" --quick" if takes_quick else "")
    return BENCH.sub(quick, shell_text)


def run_block(language, text, timeout=BLOCK_SECONDS):
    """Runs one block; returns (exit status or None on timeout, output)."""
    with tempfile.TemporaryDirectory() as scratch:
        if RUN[language] == "shell":
            argv = ["bash", "-euo", "pipefail", "-c", with_quick(text)]
        else:
            script = Path(scratch) / "block.py"
            script.write_text(text)
            argv = [str(PYTHON), str(script)]
        log_path = Path(scratch) / "output"
        # a file, not a pipe: a server left in the background would hold a pipe open
        with open(log_path, "w") as log:
            process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                status = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                status = None
            finally:
                try:
                    os.killpg(process.pid, signal.SIGKILL)  # the block's leftovers (servers)
                except ProcessLookupError:
                    pass
                process.wait()
        return status, log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def demo_out():
    """The README's first command leaves demo_out/; where it is missing, the demo's quickest run
    makes the files the blocks use."""
    if not (ROOT / "demo_out" / "digits.pt").is_file():
        subprocess.run([str(PYTHON), "demo/demo.py", "--epochs", "1", "--limit", "64", "--timing-rounds", "0",
                        "--no-aoti"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    return ROOT / "demo_out"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_block_runs_as_pasted(document, demo_out):
    if not PYTHON.exists():
        pytest.skip("no .venv: run `bash scripts/demo.sh` first, as the README says")
    ran, skipped = 0, []
    for line, language, text in blocks(document):
        if language not in RUN:
            continue
        reason = skip_reason(language, text)
        if reason is not None:
            skipped.append(f"line {line}: {reason}")
            continue
        start = time.monotonic()
        status, output = run_block(language, text)
        where = f"{document.relative_to(ROOT)}:{line} ({language}, {time.monotonic() - start:.0f} s)"
        assert status is not None, f"{where}: still running after {BLOCK_SECONDS} s\n{output[-4000:]}"
        assert status == 0, f"{where}: exit status {status}\n{text}\n--- output ---\n{output[-4000:]}"
        ran += 1
    print(f"{document.name}: {ran} block(s) run; skipped by design: {skipped or 'none'}")


def test_every_block_names_its_language():
    """A fence without a language (or with an unknown one) would hide a command from this test."""
    for document in DOCUMENTS:
        for line, language, _ in blocks(document):
            assert language in RUN or language in NOT_RUN, f"{document.relative_to(ROOT)}:{line}: ```{language}"


def test_a_broken_block_fails():
    """The runner itself: a failing command, a failing pipe, an unset variable, a Python error and
    a block that hangs are failures; a background process is killed after its block."""
    assert run_block("bash", "true\n")[0] == 0
    assert run_block("bash", "false\ntrue\n")[0] != 0
    assert run_block("bash", "false | cat\n")[0] != 0
    assert run_block("bash", "echo $NOT_SET_ANYWHERE\n")[0] != 0
    assert run_block("python", "import sys\nsys.exit('broken')\n")[0] != 0
    assert run_block("python", "raise ValueError('broken')\n")[0] != 0
    assert run_block("bash", "sleep 30\n", timeout=1)[0] is None
    with tempfile.TemporaryDirectory() as scratch:
        marker = Path(scratch) / "alive"
        status, _ = run_block("bash", f"(sleep 1; touch {marker}) &\ntrue\n")
        assert status == 0
        time.sleep(1.5)
        assert not marker.exists(), "a background process outlived its block"


def test_skipped_commands_and_quick_benches():
    assert skip_reason("bash", "bash scripts/demo.sh    # setup\nbash scripts/test.sh\n") is not None
    assert skip_reason("bash", "bash scripts/setup.sh\n") is None
    assert skip_reason("bash", "MATTERHORN_X=1 bash scripts/sanitize.sh --fast\n") is not None
    with pytest.raises(AssertionError):
        skip_reason("bash", "bash scripts/test.sh\nls\n")
    assert with_quick(".venv/bin/python bench/bench_conv.py    # note\n") == ".venv/bin/python bench/bench_conv.py --quick    # note\n"
    assert with_quick(".venv/bin/python bench/bench_serve.py\n") == ".venv/bin/python bench/bench_serve.py\n"
    assert with_quick(".venv/bin/python bench/bench_conv.py --quick\n") == ".venv/bin/python bench/bench_conv.py --quick\n"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s"]))
