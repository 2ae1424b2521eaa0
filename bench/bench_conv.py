"""Convolutions: mth.snn layers against torch.nn on the folded tensor, forward+backward.

The convolution cases of bench/bench_gpu.py, cut down (B of 4 or 1, fewer steps or pixels) to fit a
2-core CPU.

    .venv/bin/python bench/bench_conv.py [--quick]

``--quick`` is a smoke run of the script: one short round per case, on T=2 B=1, one thread (its
times say nothing about speed).
"""

import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import matterhorn_pytorch as mth  # noqa: E402
from common import Case, folded, main, training_step  # noqa: E402

# (description, class name, constructor arguments, input shape [T, B, C, ...])
CASES = [
    ("Conv2d 128->128 3x3, 32x32", "Conv2d", dict(in_channels=128, out_channels=128, kernel_size=3, padding=1), (4, 4, 128, 32, 32)),
    ("Conv2d 256->256 3x3, 16x16", "Conv2d", dict(in_channels=256, out_channels=256, kernel_size=3, padding=1), (4, 4, 256, 16, 16)),
    ("Conv2d 2->64 3x3, 128x128", "Conv2d", dict(in_channels=2, out_channels=64, kernel_size=3, padding=1), (4, 4, 2, 128, 128)),
    ("Conv2d 64->64 3x3, 16x16", "Conv2d", dict(in_channels=64, out_channels=64, kernel_size=3, padding=1), (4, 1, 64, 16, 16)),
    ("Conv1d 64->128 k3, L=700", "Conv1d", dict(in_channels=64, out_channels=128, kernel_size=3, padding=1), (8, 4, 64, 700)),
    ("ConvTranspose2d 64->32 4x4 s2, 16x16", "ConvTranspose2d", dict(in_channels=64, out_channels=32, kernel_size=4, stride=2, padding=1), (4, 4, 64, 16, 16)),
]
QUICK = "--quick" in sys.argv[1:]


def conv_case(description, name, kwargs, shape):
    if QUICK:
        shape = (2, 1) + tuple(shape[2:])
    label = f"{description}, T={shape[0]} B={shape[1]}"
    torch.manual_seed(0)
    ours = getattr(mth.snn, name)(**kwargs)
    fold = getattr(nn, name)(**kwargs)
    fold.load_state_dict(ours.state_dict())
    spikes = (torch.rand(shape) < 0.15).float()  # spikes at 15% density
    x_ours, x_fold = spikes.clone().requires_grad_(), spikes.clone().requires_grad_()
    return Case(f"{label} fwd+bwd", training_step(ours, ours, x_ours), training_step(fold, folded(fold), x_fold))


if __name__ == "__main__":
    if QUICK:
        torch.set_num_threads(1)
    main("Convolutions, CPU", [conv_case(*case) for case in CASES])
