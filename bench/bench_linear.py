"""Linear: mth.snn.Linear against torch.nn.Linear on the folded tensor (what SpikingJelly does).

    .venv/bin/python bench/bench_linear.py [--quick]

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

QUICK = "--quick" in sys.argv[1:]


def linear_cases(shape, in_features, out_features, tokens=""):
    if QUICK:
        shape = (2, 1) + tuple(shape[2:])
    torch.manual_seed(0)
    label = f"Linear {in_features}->{out_features}, T={shape[0]} B={shape[1]}{tokens}"
    ours = mth.snn.Linear(in_features, out_features)
    fold = nn.Linear(in_features, out_features)
    fold.load_state_dict(ours.state_dict())
    spikes = (torch.rand(*shape, in_features) < 0.15).float()  # spikes at 15% density
    x_ours = spikes.clone().requires_grad_()
    x_fold = spikes.clone().requires_grad_()

    def inference(forward, x):
        def run():
            with torch.no_grad():
                forward(x)
        return run

    return [
        Case(f"{label} fwd", inference(ours, x_ours), inference(folded(fold), x_fold)),
        Case(f"{label} fwd+bwd", training_step(ours, ours, x_ours), training_step(fold, folded(fold), x_fold)),
    ]


if __name__ == "__main__":
    if QUICK:
        torch.set_num_threads(1)
    main("Linear, CPU", linear_cases((4, 8), 256, 256) + linear_cases((4, 64, 64), 384, 1536, " N=64"))
