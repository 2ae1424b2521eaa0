"""Shared pieces of the fuzzer (tests/test_fuzz_cases.py, run by tests/test_fuzz.py): Hypothesis
profiles, tensor builders (dtypes, layouts, devices), the outcome oracle and error-bound helpers.

Tolerances follow from the arithmetic, not from tuning: a result that sums K terms whose absolute
values add up to S is within about K * eps(dtype) * S of the exact value for any summation order
(eps = torch.finfo(dtype).eps, twice the unit roundoff, for float16/bfloat16 too although their
accumulation is float32). The float64 reference is torch.nn (or plain torch) on float64 copies.
"""

import os
from typing import Callable, Optional, Sequence

import torch
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st

# ---- budget -------------------------------------------------------------------------------------
# "ci": bounded and reproducible (derandomize: the same examples every run). "long": selected by
# MATTERHORN_FUZZ=long, fresh random examples each run (see docs/TESTING.md).
_COMMON = dict(deadline=None, print_blob=True, database=None,  # nothing written to the tree
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=int(os.environ.get("MATTERHORN_FUZZ_EXAMPLES", "30")),
                          derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("MATTERHORN_FUZZ_EXAMPLES", "1500")),
                          derandomize=False, **_COMMON)
PROFILE = os.environ.get("MATTERHORN_FUZZ", "ci")
settings.load_profile(PROFILE)

# Exceptions a bad input may raise (NotImplementedError is a RuntimeError).
ALLOWED = (ValueError, TypeError, RuntimeError, IndexError)

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NON_FLOATS = [torch.int64, torch.int32, torch.uint8, torch.bool]
LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced"]


# ---- crash reproducers --------------------------------------------------------------------------
# A crash kills the child process before Hypothesis can print the example: each case is written
# (overwritten) to this file just before our code runs, and the parent prints it.
_LAST_CASE = os.environ.get("MATTERHORN_FUZZ_LAST_CASE")


def record(case: str) -> None:
    """Note the case (printed with a falsifying example) and leave it for the parent on a crash."""
    note(case)
    if _LAST_CASE:
        with open(_LAST_CASE, "w") as f:  # closed, hence in the kernel's hands: survives a signal
            f.write(case)


# ---- tensors ------------------------------------------------------------------------------------
sizes = st.integers(0, 3)          # zero sizes included
positive_sizes = st.integers(1, 3)
seeds = st.integers(0, 2**31 - 1)


def make_tensor(shape: Sequence[int], dtype: torch.dtype, layout: str, device: str, seed: int,
                channel_dim: Optional[int] = None, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """Values randn * scale + offset (integers 0..2, or booleans, for the other dtypes) in the
    given memory layout: "contiguous"; "channels_last" (the channel dimension innermost in memory);
    "transposed" (the last two dimensions swapped in memory); "sliced" (every other element of
    the first dimension of a buffer twice as big)."""
    shape = list(shape)
    generator = torch.Generator().manual_seed(seed)

    def values(s):
        if device == "meta":
            return torch.empty(s, dtype=dtype, device="meta")
        if dtype == torch.bool:
            return torch.randint(0, 2, s, generator=generator).bool()
        if not dtype.is_floating_point:
            return torch.randint(0, 3, s, generator=generator).to(dtype)
        return (torch.randn(s, generator=generator, dtype=torch.float64) * scale + offset).to(dtype)

    rank = len(shape)
    if layout == "channels_last" and channel_dim is not None and channel_dim < rank - 1:
        order = [d for d in range(rank) if d != channel_dim] + [channel_dim]
        return values([shape[d] for d in order]).movedim(-1, channel_dim)
    if layout == "transposed" and rank >= 2:
        return values(shape[:-2] + [shape[-1], shape[-2]]).transpose(-1, -2)
    if layout == "sliced" and rank >= 1:
        return values([2 * shape[0]] + shape[1:])[::2]
    return values(shape)


def describe(t: Optional[torch.Tensor]) -> str:
    if t is None:
        return "None"
    where = "" if t.device.type == "cpu" else f", device='{t.device.type}'"
    layout = "" if t.is_contiguous() else f" (strides {list(t.stride())})"
    return f"<{t.dtype} {list(t.shape)}{where}{layout}>"


# ---- the oracle ---------------------------------------------------------------------------------
class Raised:
    def __init__(self, error: BaseException):
        self.error = error

    def __repr__(self):
        return f"raised {type(self.error).__name__}: {str(self.error)[:300]}"


def outcome(f: Callable):
    """f's result, or Raised(error) for an exception of any type (checked by the caller)."""
    try:
        return f()
    except Exception as error:  # noqa: BLE001 - the type is what the property checks
        return Raised(error)


def check_clean_error(result, name: Optional[str] = None, user_shape=None, folded_shape=None,
                      types=ALLOWED) -> None:
    """An error a user can act on: an allowed type, a message, the layer's name, and not the folded
    [T*B, ...] shape alone (the user's own shape must be named beside it)."""
    assert isinstance(result, Raised), f"expected a clean error, got a result {describe(result) if isinstance(result, torch.Tensor) else result!r}"
    error = result.error
    assert isinstance(error, types), f"expected one of {[t.__name__ for t in types]}, got {type(error).__name__}: {error}"
    message = str(error).strip()
    assert message, f"{type(error).__name__} with an empty message"
    if name is not None:  # one of the names (the layer's, or an op's and its family's), any case
        names = (name,) if isinstance(name, str) else tuple(name)
        assert any(n.lower() in message.lower() for n in names), f"the message does not name {' or '.join(names)}: {message!r}"
    if folded_shape is not None and user_shape is not None and list(folded_shape) != list(user_shape):
        assert str(list(folded_shape)) not in message or str(list(user_shape)) in message, \
            f"the message shows the folded shape {list(folded_shape)} and not the input's {list(user_shape)}: {message!r}"


def finfo_eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close_bound(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|actual - expected| <= bound elementwise (float64); NaN and inf exactly where expected has them."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)}, expected {list(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    # plus the float64 reference's own rounding, which a bound of exactly 0 (e.g. x - mean of one
    # value) would not allow, and the result's rounding below the smallest normal number (a relative
    # bound does not cover it): the spacing of the subnormals of its dtype
    info = torch.finfo(actual.dtype) if actual.is_floating_point() else None
    subnormal = info.smallest_normal * info.eps if info is not None else 0.0
    bound = bound.detach().double().cpu().expand_as(e) + 1e-12 + subnormal
    special = ~torch.isfinite(e)
    assert torch.equal(torch.isnan(a), torch.isnan(e)), \
        f"{what}: NaN at {torch.nonzero(torch.isnan(a) != torch.isnan(e))[:5].tolist()} (actual {a.flatten()[:8].tolist()}, expected {e.flatten()[:8].tolist()})"
    inf = special & ~torch.isnan(e)
    assert torch.equal(a[inf], e[inf]), f"{what}: infinities differ"
    finite = ~special
    excess = (a[finite] - e[finite]).abs() - bound[finite]
    if excess.numel() and excess.max() > 0:
        i = int(excess.argmax())
        raise AssertionError(
            f"{what}: |actual - expected| exceeds the arithmetic bound at {int(excess.gt(0).sum())} of "
            f"{excess.numel()} elements; worst: actual {a[finite][i].item()!r}, expected {e[finite][i].item()!r}, "
            f"bound {bound[finite][i].item()!r}")


def bilinear_bounds(f: Callable, args64: Sequence[torch.Tensor], dy64: Optional[torch.Tensor], u: float,
                    factor: float = 2.0):
    """Bounds for a map f(x, w, b) that sums products (linear, convolutions): per output element
    K terms with absolute sum S, |error| <= factor * u * (K + 1) * S. S is f on the absolute values
    and K is f on ones (zero padding counts as no term). With dy, the same for the gradients of
    <dy, f>: the gradients of <|dy|, f(|x|, ...)> and of <1, f(1, ...)>."""
    present = [a for a in args64 if a is not None]

    def run(transform, dy):
        leaves = [transform(a).requires_grad_(dy is not None) for a in present]
        it = iter(leaves)
        out = f(*[next(it) if a is not None else None for a in args64])
        if dy is None:
            return out.detach(), []
        grads = torch.autograd.grad(out, leaves, dy(out), allow_unused=True)
        return out.detach(), [torch.zeros_like(l) if g is None else g for l, g in zip(leaves, grads)]

    magnitude, grad_magnitudes = run(lambda a: a.detach().abs(), None if dy64 is None else (lambda out: dy64.abs()))
    count, grad_counts = run(lambda a: torch.ones_like(a.detach()), None if dy64 is None else (lambda out: torch.ones_like(out)))
    forward = factor * u * (count + 1) * magnitude
    grads = [factor * u * (k + 1) * s for k, s in zip(grad_counts, grad_magnitudes)]
    return forward, grads


def normalization_bound(x64, mean, var, count, eps, weight_abs, bias_abs, y64, u, factor=4.0, conditioned=True):
    """Bound for y = (x - mean) * rsqrt(var + eps) * w + b with statistics over `count` values:
    the mean is off by ~count*u*E|x|, the variance by ~count*u*E[x^2] (relative to var + eps, the
    conditioning), then the element arithmetic (a few roundings of |x|, |mean|, |y|, |b|).
    Arguments broadcast against x64. conditioned=False: the statistics are exact inputs."""
    invstd = (var + eps).abs().rsqrt()
    w = 1.0 if weight_abs is None else weight_abs
    b = 0.0 if bias_abs is None else bias_abs
    xc = (x64 - mean).abs()
    element = w * invstd * (x64.abs() + mean.abs()) + y64.abs() + b
    if not conditioned:
        return factor * u * (element + 1e-300)
    second_moment = mean * mean + var  # E[x^2]: E|x| <= its square root
    return factor * u * (count * w * invstd * (second_moment.sqrt() + xc * second_moment / (var + eps).abs()) + element)


@st.composite
def float_or_other_dtype(draw, other_probability_draw=st.integers(0, 9)):
    """Mostly floating dtypes, sometimes an integer or bool one (which must be a TypeError)."""
    if draw(other_probability_draw) == 0:
        return draw(st.sampled_from(NON_FLOATS))
    return draw(st.sampled_from(FLOATS))
