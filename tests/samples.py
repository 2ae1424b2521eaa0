"""Shared by the op tests: the devices to run on, one tensor helper, error bounds that follow
from the arithmetic, and one list of sample inputs per op (each list feeds that op's
correctness tests against torch.nn, gradcheck and torch.library.opcheck)."""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(*shape, dtype=torch.float32, device="cpu", requires_grad=False, positive=False):
    """Standard normal values (|values| + 0.5 if positive: variances, scales)."""
    t = torch.randn(*shape, dtype=dtype, device=device)
    if positive:
        t = t.abs() + 0.5
    return t.requires_grad_(requires_grad)


def rounding(dtype):
    """One unit in the last place of dtype at 1: rounding a result to dtype costs at most half of
    it (relative), and a result near a rounding midpoint may round the other way."""
    return torch.finfo(dtype).eps


def sum_error(n, dtype=torch.float32):
    """The worst-case relative error of a sum of n terms in dtype, in any order, as a fraction of
    the sum of the terms' magnitudes (gamma_n ~ n * eps)."""
    return n * torch.finfo(dtype).eps


def assert_within(actual, expected, bound, msg=""):
    """|actual - expected| <= bound elementwise (the comparison in float64)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual - expected).abs()
    excess = error - torch.as_tensor(bound, dtype=torch.float64).expand_as(error)
    worst = int(excess.flatten().argmax()) if error.numel() else 0
    assert error.numel() == 0 or excess.flatten()[worst] <= 0, (
        f"{msg} off by {error.flatten()[worst].item():.3g} where {(error - excess).flatten()[worst].item():.3g} "
        f"is allowed, at flat index {worst} of {tuple(error.shape)}")
