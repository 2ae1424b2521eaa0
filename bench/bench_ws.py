"""Weight-standardised layers: mth.snn.WSConv2d / WSLinear against the torch.nn layer on the
folded tensor with the weight standardised by torch ops (matterhorn 2.0.0's formula: mean and
variance detached), one training step (forward + backward) each.

    .venv/bin/python bench/bench_ws.py [--quick]

``--quick`` is a smoke run of the script: one short round per case, on T=2 B=1, one thread (its
times say nothing about speed).
"""

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import matterhorn_pytorch as mth  # noqa: E402
from common import Case, main, training_step  # noqa: E402

# (description, class name, constructor arguments, input shape [T, B, ...])
CASES = [
    ("WSConv2d 2->64 3x3, 64x64", "WSConv2d", dict(in_channels=2, out_channels=64, kernel_size=3, padding=1), (4, 4, 2, 64, 64)),
    ("WSConv2d 64->128 3x3, 32x32", "WSConv2d", dict(in_channels=64, out_channels=128, kernel_size=3, padding=1), (4, 4, 64, 32, 32)),
    ("WSConv2d 256->256 3x3, 8x8", "WSConv2d", dict(in_channels=256, out_channels=256, kernel_size=3, padding=1), (8, 4, 256, 8, 8)),
    ("WSLinear 2048->512", "WSLinear", dict(in_features=2048, out_features=512), (8, 16, 2048)),
    ("WSLinear 512->10", "WSLinear", dict(in_features=512, out_features=10), (8, 32, 512)),
]
QUICK = "--quick" in sys.argv[1:]


class TorchWS(nn.Module):
    """The torch.nn layer (Linear, Conv2d) on the folded [T*B, ...] tensor, its weight standardised
    per output channel with torch ops: var_mean of the detached weight, then one sub and one
    addcmul (the fewest passes over the weight torch ops allow)."""

    def __init__(self, twin, eps):
        super().__init__()
        self.twin = twin
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(twin.weight.shape[0]))
        self.beta = nn.Parameter(torch.zeros(twin.weight.shape[0]), requires_grad=False)

    def forward(self, x):
        w = self.twin.weight
        shape = (-1,) + (1,) * (w.dim() - 1)
        var, mean = torch.var_mean(w.detach().flatten(1), dim=1)  # unbiased, as matterhorn 2.0.0
        scale = self.gamma / ((var * w[0].numel()).sqrt() + self.eps)
        weight = torch.addcmul(self.beta.view(shape), w - mean.view(shape), scale.view(shape))
        folded = x.flatten(0, 1)
        if isinstance(self.twin, nn.Linear):
            y = F.linear(folded, weight, self.twin.bias)
        else:
            y = self.twin._conv_forward(folded, weight, self.twin.bias)
        return y.unflatten(0, x.shape[:2])


def ws_case(description, name, kwargs, shape):
    if QUICK:
        shape = (2, 1) + tuple(shape[2:])
    label = f"{description}, T={shape[0]} B={shape[1]}"
    torch.manual_seed(0)
    ours = getattr(mth.snn, name)(**kwargs)
    fold = TorchWS(getattr(nn, name[2:])(**kwargs), ours.eps)
    fold.load_state_dict({f"twin.{k}" if k in ("weight", "bias") else k: v for k, v in ours.state_dict().items()})
    spikes = (torch.rand(shape) < 0.15).float()  # spikes at 15% density
    x_ours, x_fold = spikes.clone().requires_grad_(), spikes.clone().requires_grad_()
    with torch.no_grad():
        torch.testing.assert_close(ours(spikes), fold(spikes), rtol=1e-4, atol=1e-4)  # the same layer
    return Case(f"{label} fwd+bwd", training_step(ours, ours, x_ours), training_step(fold, fold, x_fold))


def standardization_alone(out, fan_in):
    """The weight's part of a step alone: standardise [out, fan_in] and back-propagate into the
    weight and gamma (ours: the op; fold: TorchWS's torch ops)."""
    torch.manual_seed(0)
    layer = TorchWS(nn.Linear(fan_in, out), 1e-6)
    weight, gamma, beta = layer.twin.weight, layer.gamma, layer.beta
    grad = torch.randn(out, fan_in)

    def ours():
        torch.ops.matterhorn.weight_standardize(weight, gamma, beta, 1e-6).backward(grad)

    def fold():
        var, mean = torch.var_mean(weight.detach(), dim=1)
        scale = gamma / ((var * fan_in).sqrt() + 1e-6)
        torch.addcmul(beta.view(-1, 1), weight - mean.view(-1, 1), scale.view(-1, 1)).backward(grad)

    return Case(f"weight standardisation alone, [{out}, {fan_in}] fwd+bwd", ours, fold)


if __name__ == "__main__":
    if QUICK:
        torch.set_num_threads(1)
    main("Weight-standardised layers, CPU", [ws_case(*case) for case in CASES] + [standardization_alone(512, 2048)])
