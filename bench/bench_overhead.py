"""Per-call cost: every layer on a tiny input, where the time is the call itself (Python, the
dispatcher, autograd), not arithmetic; ours against torch.nn on the folded tensor, one thread.
Small layers at small batches are where this decides the speed.

    .venv/bin/python bench/bench_overhead.py [--quick]
"""

import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import matterhorn_pytorch as mth  # noqa: E402
from bench_norm import SpikingJellyBNTT, SpikingJellyTEBN  # noqa: E402
from common import Case, folded, main, training_step  # noqa: E402

T, B = 2, 2
# (label, class name, constructor arguments, input shape [T, B, ...], eval mode)
LAYERS = [
    ("Linear 8->8", "Linear", dict(in_features=8, out_features=8), (T, B, 8), False),
    ("Conv2d 2->2 3x3, 4x4", "Conv2d", dict(in_channels=2, out_channels=2, kernel_size=3, padding=1), (T, B, 2, 4, 4), False),
    ("ConvTranspose2d 2->2 2x2 s2, 4x4", "ConvTranspose2d", dict(in_channels=2, out_channels=2, kernel_size=2, stride=2),
     (T, B, 2, 4, 4), False),
    ("BatchNorm2d 2ch, 4x4, training", "BatchNorm2d", dict(num_features=2), (T, B, 2, 4, 4), False),
    ("BatchNorm2d 2ch, 4x4, eval", "BatchNorm2d", dict(num_features=2), (T, B, 2, 4, 4), True),
    ("LayerNorm(8)", "LayerNorm", dict(normalized_shape=8), (T, B, 4, 8), False),
]


# The temporal normalizations against the same definitions in torch.nn (SpikingJelly's way): tdBN is
# BatchNorm2d on the folded tensor, TEBN that times the per-step scale, BNTT a loop of BatchNorm2d.
TEMPORAL = [
    ("tdBN 2ch, 4x4", lambda: mth.snn.ThresholdDependentBatchNorm2d(1.0, 1.0, 2), lambda: Folded(nn.BatchNorm2d(2))),
    ("TEBN 2ch, 4x4", lambda: mth.snn.TemporalEffectiveBatchNorm2d(T, 2), lambda: SpikingJellyTEBN(T, 2)),
    ("BNTT 2ch, 4x4", lambda: mth.snn.BatchNormThroughTime2d(T, 2), lambda: SpikingJellyBNTT(T, 2)),
]


class Folded(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def no_grad(forward, x):
    def call():
        with torch.no_grad():
            forward(x)
    return call


def cases():
    for label, name, kwargs, shape, eval_mode in LAYERS:
        torch.manual_seed(0)
        ours, reference = getattr(mth.snn, name)(**kwargs), getattr(nn, name)(**kwargs)
        reference.load_state_dict(ours.state_dict())
        ours.train(not eval_mode), reference.train(not eval_mode)
        x = torch.randn(shape)
        x_ours, x_fold = x.clone().requires_grad_(), x.clone().requires_grad_()
        yield Case(f"{label} fwd+bwd", training_step(ours, ours, x_ours), training_step(reference, folded(reference), x_fold))
        yield Case(f"{label} fwd, no_grad", no_grad(ours, x), no_grad(folded(reference), x))
    for label, make_ours, make_reference in TEMPORAL:
        for eval_mode in (False, True):
            torch.manual_seed(0)
            ours, reference = make_ours(), make_reference()
            ours.train(not eval_mode), reference.train(not eval_mode)
            x = torch.randn(T, B, 2, 4, 4)
            mode = "eval" if eval_mode else "training"
            yield Case(f"{label}, {mode} fwd+bwd", training_step(ours, ours, x.clone().requires_grad_()),
                       training_step(reference, reference, x.clone().requires_grad_()))
            yield Case(f"{label}, {mode} fwd, no_grad", no_grad(ours, x), no_grad(reference, x))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main("Per-call cost, tiny inputs, CPU", list(cases()), unit="us")
