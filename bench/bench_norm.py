"""Normalization: mth.snn.BatchNorm2d / LayerNorm against torch.nn on the folded tensor,
forward+backward in training; TEBN and BNTT against our BatchNorm2d and against their
definitions composed from torch ops (SpikingJelly's way). The normalization cases of bench/bench_gpu.py, cut down (T=4, B=4
or 16) to fit a 2-core CPU, contiguous (NCHW) and channels_last. The share of the memory floor (a training
step moves the tensor at least 8 times for BatchNorm, 5 for LayerNorm), timed as
`copy_` of a tensor of the same size into an existing one (2 tensor-sizes moved) in the same run.

    .venv/bin/python bench/bench_norm.py [--quick]
"""

import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import matterhorn_pytorch as mth  # noqa: E402
from common import Case, folded, main, training_step  # noqa: E402

QUICK = "--quick" in sys.argv[1:]  # a smoke run: T=1 B=1, one thread

# (label, ours, torch.nn twin, input shape [T, B, ...], channels_last)
PASSES = dict(BatchNorm2d=8, LayerNorm=5)
CASES = [
    ("BatchNorm2d 128ch 32x32, T=4 B=4 (8 MiB)", lambda: mth.snn.BatchNorm2d(128), lambda: nn.BatchNorm2d(128), (4, 4, 128, 32, 32), False),
    ("  same, channels_last", lambda: mth.snn.BatchNorm2d(128), lambda: nn.BatchNorm2d(128), (4, 4, 128, 32, 32), True),
    ("BatchNorm2d 64ch 128x128, T=4 B=4 (64 MiB)", lambda: mth.snn.BatchNorm2d(64), lambda: nn.BatchNorm2d(64), (4, 4, 64, 128, 128), False),
    ("  same, channels_last", lambda: mth.snn.BatchNorm2d(64), lambda: nn.BatchNorm2d(64), (4, 4, 64, 128, 128), True),
    ("LayerNorm(384), T=4 B=16 N=64", lambda: mth.snn.LayerNorm(384), lambda: nn.LayerNorm(384), (4, 16, 64, 384), False),
    ("LayerNorm(768), T=4 B=4 N=196", lambda: mth.snn.LayerNorm(768), lambda: nn.LayerNorm(768), (4, 4, 196, 768), False),
]


class SpikingJellyTEBN(nn.Module):
    """TEBN as SpikingJelly composes it from torch ops: BatchNorm on the folded tensor, then a
    multiplication by the per-step scale (a second pass over the tensor, and its backward)."""

    def __init__(self, T, C):
        super().__init__()
        self.bn = nn.BatchNorm2d(C)
        self.scale = nn.Parameter(torch.ones(T))

    def forward(self, x):
        y = self.bn(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        return y * self.scale.view(-1, 1, 1, 1, 1)


class SpikingJellyBNTT(nn.Module):
    """BNTT as a loop of bias-free torch.nn BatchNorms, one per step, stacked."""

    def __init__(self, T, C):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(C, affine=False) for _ in range(T))
        self.weight = nn.Parameter(torch.ones(T, C))

    def forward(self, x):
        return torch.stack([bn(x[t]) * self.weight[t].view(-1, 1, 1) for t, bn in enumerate(self.bns)])


# The temporal normalizations, training steps on the BatchNorm2d cases' tensors: against our plain
# BatchNorm2d (the core's cost of a scale or per-step parameters: goal <= 1.10x), and against the same
# definitions composed from torch ops (goal < 1).
TEMPORAL = [
    ("TEBN", lambda T, C: mth.snn.TemporalEffectiveBatchNorm2d(T, C), SpikingJellyTEBN),
    ("BNTT", lambda T, C: mth.snn.BatchNormThroughTime2d(T, C), SpikingJellyBNTT),
]


def temporal_cases():
    for size_label, shape in (("128ch 32x32, T=4 B=4", (4, 4, 128, 32, 32)), ("64ch 128x128, T=4 B=4", (4, 4, 64, 128, 128))):
        if QUICK:
            shape, size_label = (2, 1) + tuple(shape[2:]), f"{size_label} [quick: T=2 B=1]"
        T, C = shape[0], shape[2]
        x = torch.randn(shape)
        grad = torch.randn_like(x)
        for name, make, make_composed in TEMPORAL:
            torch.manual_seed(0)
            ours, plain, composed = make(T, C), mth.snn.BatchNorm2d(C), make_composed(T, C)
            step = training_step(ours, ours, x.clone().requires_grad_(), grad)
            yield Case(f"{name} {size_label} fwd+bwd vs our BatchNorm2d", step,
                       training_step(plain, plain, x.clone().requires_grad_(), grad))
            yield Case(f"{name} {size_label} fwd+bwd vs torch ops composed", step,
                       training_step(composed, composed, x.clone().requires_grad_(), grad))


def norm_case(label, make_ours, make_fold, shape, channels_last):
    if QUICK:
        shape, label = (1, 1) + tuple(shape[2:]), f"{label} [quick: T=1 B=1]"
    torch.manual_seed(0)
    ours, fold = make_ours(), make_fold()
    fold.load_state_dict(ours.state_dict())
    x = torch.randn(shape)
    if channels_last:  # [T, B, C, H, W] whose memory is [T, B, H, W, C]
        x = x.movedim(2, -1).contiguous().movedim(-1, 2)
    x_ours, x_fold = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn_like(x)
    copy_into = torch.empty_like(x)
    return Case(f"{label} fwd+bwd", training_step(ours, ours, x_ours, grad),
                training_step(fold, folded(fold), x_fold, grad),
                floor=lambda: copy_into.copy_(x), floor_copies=PASSES[type(fold).__name__] / 2)


if __name__ == "__main__":
    if QUICK:
        torch.set_num_threads(1)
    main("Normalization, CPU", [norm_case(*case) for case in CASES] + list(temporal_cases()))
