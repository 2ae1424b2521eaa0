"""Linear: mth.snn.Linear against torch.nn.Linear on the folded tensor (what SpikingJelly does).

    .venv/bin/python bench/bench_linear.py [--quick]
"""

import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import matterhorn_pytorch as mth  # noqa: E402
from common import Case, compare, print_table  # noqa: E402


def linear_cases(shape, in_features, out_features, label):
    torch.manual_seed(0)
    ours = mth.snn.Linear(in_features, out_features)
    fold = nn.Linear(in_features, out_features)
    fold.load_state_dict(ours.state_dict())
    spikes = (torch.rand(*shape, in_features) < 0.15).float()  # 15% density, as in ANCHORS.md
    x_ours = spikes.clone().requires_grad_()
    x_fold = spikes.clone().requires_grad_()

    def fold_forward(x):
        return fold(x.flatten(0, 1)).unflatten(0, x.shape[:2])

    def train_step(layer_forward, x, layer):
        def step():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer_forward(x).sum().backward()
        return step

    def inference(layer_forward, x):
        def run():
            with torch.no_grad():
                layer_forward(x)
        return run

    return [
        Case(f"{label} fwd", inference(ours, x_ours), inference(fold_forward, x_fold)),
        Case(f"{label} fwd+bwd", train_step(ours, x_ours, ours), train_step(fold_forward, x_fold, fold)),
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (a smoke run)")
    args = parser.parse_args()
    cases = linear_cases((4, 8), 256, 256, "Linear 256->256, T=4 B=8")
    cases += linear_cases((4, 64, 64), 384, 1536, "Linear 384->1536, T=4 B=64 N=64")
    rows = compare(cases, rounds=1 if args.quick else 5, min_run_time=0.1 if args.quick else 1.0)
    print_table("Linear, CPU", rows)


if __name__ == "__main__":
    main()
