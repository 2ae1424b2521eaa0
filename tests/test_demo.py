"""The digits demo (the project's main job) on a tiny budget: every part runs, the figures are
written, the C++ program's scores for the held-out spike trains equal Python's for both exports,
and the server's class for a held-out digit is Python's. The accuracy needs the full run and is
not checked here."""

import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "demo" / "demo.py"


def test_demo_parts_on_a_tiny_budget(tmp_path):
    result = subprocess.run(
        [sys.executable, str(DEMO), "--epochs", "1", "--limit", "64", "--timing-rounds", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    output = result.stdout
    assert result.returncode == 0, output + result.stderr[-4000:]

    assert re.search(r"^test accuracy: \d\.\d{4}$", output, re.MULTILINE), output
    for name in ("history.png", "raster.png", "firing_rates.png"):
        figure = tmp_path / name
        assert figure.stat().st_size > 1000 and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    timing = re.search(r"matterhorn ([\d.]+) s, folded torch.nn ([\d.]+) s, ratio [\d.]+ \(loss ([\d.]+) vs ([\d.]+)\)",
                       output)
    assert timing, output
    assert timing.group(3) == timing.group(4)  # the folded torch.nn network is the same network

    cpp = re.findall(r"C\+\+ (digits\.pt2?): scores \[64, 10\], max \|C\+\+ - Python\| = (\S+), classes (\w+)", output)
    assert sorted(name for name, _, _ in cpp) == ["digits.pt", "digits.pt2"], output
    for name, difference, classes in cpp:
        assert float(difference.rstrip(",")) <= 1e-5 and classes == "equal", (name, difference, classes)

    served = re.search(r"matterhorn_serve digits\.pt2 on 127\.0\.0\.1:\d+: .* HTTP 200, scores \[1, 10\], "
                       r"server class (\d), Python class (\d)$", output, re.MULTILINE)
    assert served and served.group(1) == served.group(2), output
