"""The Python side of the C++ example: the network trained (here: a few BatchNorm steps) in
Python, its weights saved (mth.save_state_dict) for snn_inference.cpp, which rebuilds it with
the C++ API and loads them (matterhorn::load_state_dict).

    python examples/cpp/net.py OUT_DIR      # writes weights.pt, input.pt, expected.pt
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn

import matterhorn_pytorch as mth


class Net(nn.Module):
    """[T, B, 2, 8, 8] spikes -> [T, B, 10]."""

    def __init__(self):
        super().__init__()
        self.conv = mth.snn.Conv2d(2, 8, 3, padding=1)
        self.bn = mth.snn.BatchNorm2d(8)
        self.fc = mth.snn.Linear(8 * 8 * 8, 10)

    def forward(self, spikes: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(spikes))).flatten(2))


def export(out_dir: Path) -> torch.Tensor:
    """Save weights, an input and the expected output; return the expected output."""
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for _ in range(3):  # running statistics that are not the initial ones
            net((torch.rand(4, 8, 2, 8, 8) < 0.3).float())
    net.eval()
    spikes = (torch.rand(5, 3, 2, 8, 8) < 0.15).float()
    expected = net(spikes).detach()
    out_dir.mkdir(parents=True, exist_ok=True)
    mth.save_state_dict(net, out_dir / "weights.pt")
    torch.save(spikes, out_dir / "input.pt")
    torch.save(expected, out_dir / "expected.pt")
    return expected


if __name__ == "__main__":
    export(Path(sys.argv[1]))
