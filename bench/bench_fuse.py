"""Eval speed of a conv net with its BatchNorms folded away (mth.fuse) against the same net
unfused: Conv-BatchNorm-ReLU x 3 + Linear on spikes [T, B, 3, H, W], no_grad, one thread (a
shared 2-core machine times one thread more steadily). Our layers, and torch.nn's layers on the
folded [T*B, ...] tensor, each fused and unfused, in the same run.

    .venv/bin/python bench/bench_fuse.py [--quick]
"""

import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import matterhorn_pytorch as mth  # noqa: E402
from common import Case, compare, machine  # noqa: E402


def network(layers, size: int, flatten_from: int) -> nn.Sequential:
    """Conv-BN-ReLU x 3 (the last two with stride 2) + Linear, from ``layers`` (mth.snn or torch.nn)."""
    model = nn.Sequential(
        layers.Conv2d(3, 32, 3, padding=1), layers.BatchNorm2d(32), nn.ReLU(),
        layers.Conv2d(32, 64, 3, padding=1, stride=2), layers.BatchNorm2d(64), nn.ReLU(),
        layers.Conv2d(64, 64, 3, padding=1, stride=2), layers.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(flatten_from), layers.Linear(64 * (size // 4) ** 2, 10),
    )
    with torch.no_grad():  # running statistics that are not the identity
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model.eval()


def no_grad(forward, x):
    def call():
        with torch.no_grad():
            forward(x)
    return call


def cases(T: int, B: int, size: int):
    torch.manual_seed(0)
    x = torch.rand(T, B, 3, size, size).bernoulli()
    ours = network(mth.snn, size, 2)
    reference = network(nn, size, 1)
    reference.load_state_dict(ours.state_dict())
    fold = x.flatten(0, 1)
    label = f"T={T} B={B} {size}x{size}"
    yield Case(f"ours, {label}", no_grad(mth.fuse(ours), x), no_grad(ours, x))
    yield Case(f"torch.nn on the folded tensor, {label}", no_grad(mth.fuse(reference), fold), no_grad(reference, fold))
    yield Case(f"ours fused / torch.nn unfused, {label}", no_grad(mth.fuse(ours), x), no_grad(reference, fold))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, one short round (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [(2, 2, 16)] if args.quick else [(4, 8, 32), (8, 16, 16)]
    rows = compare([case for T, B, size in sizes for case in cases(T, B, size)],
                   rounds=1 if args.quick else 5, min_run_time=0.1 if args.quick else 1.0)
    print(f"\nEval (no_grad) of a Conv-BN-ReLU x 3 + Linear net, fused by mth.fuse vs unfused  ({machine()})")
    print("| case | fused (ms) | unfused (ms) | fused / unfused |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['ours_ms']:.3f} | {row['fold_ms']:.3f} | {row['ratio']:.3f} |")
