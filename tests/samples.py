"""Shared by the op tests: the devices to run on, one tensor helper, error bounds that follow
from the arithmetic, and one list of sample inputs per op (each list feeds that op's
correctness tests against torch.nn, gradcheck and torch.library.opcheck)."""

import math
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

import matterhorn_pytorch  # noqa: F401  (registers torch.ops.matterhorn)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(*shape, dtype=torch.float32, device="cpu", requires_grad=False, positive=False):
    """Standard normal values (|values| + 0.5 if positive: variances, scales)."""
    t = torch.randn(*shape, dtype=dtype, device=device)
    if positive:
        t = t.abs() + 0.5
    return t.requires_grad_(requires_grad)


def opcheck(op, args, aot=True):
    """torch.library.opcheck; without aot, all but its test_aot_dispatch_dynamic (the schema, the
    autograd registration, and the Meta kernel against the real one: cheap)."""
    utils = None if aot else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, args, **({} if utils is None else dict(test_utils=utils)))


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


# ---- conv and conv_transpose ------------------------------------------------------------------

@dataclass(frozen=True)
class ConvSample:
    """One convolution: the torch.nn class and its constructor's arguments, the spatial input
    size and the leading dimensions ([T, B] or, one step, [B]). The layer tests build the layer
    from it; the op tests call matterhorn::conv / conv_transpose with the arguments the layer
    passes (or, with ``padding``, explicit (before, after) pairs that no constructor argument
    gives) and compare with torch.nn on the folded tensor."""

    name: str
    kwargs: dict
    size: tuple
    leading: tuple = (2, 2)
    dtype: torch.dtype = torch.float32
    requires_grad: bool = True
    padding: Optional[tuple] = None  # op only: (before, after) per spatial dimension
    output_size: Optional[tuple] = None  # transposed: the spatial output size asked for
    gradcheck: bool = False  # small enough for float64 gradcheck and gradgradcheck
    aot: bool = False  # opcheck through AOTAutograd too (seconds a sample; every other check runs on all)

    @property
    def id(self):
        options = "-".join(f"{k}={v}" for k, v in self.kwargs.items() if k not in ("in_channels", "out_channels"))
        extras = [f"pad={list(self.padding)}"] if self.padding else []
        extras += [f"output_size={list(self.output_size)}"] if self.output_size else []
        extras += [str(self.dtype)[6:]] if self.dtype != torch.float32 else []
        extras += ["no-grad"] if not self.requires_grad else []
        return "-".join([self.name, options, "x".join(map(str, self.leading)), *extras])

    @property
    def transposed(self):
        return self.name.startswith("ConvTranspose")

    def module(self, dtype=None, device="cpu", **extras):
        """Ours (mth.snn) or, with ours=False, torch.nn's layer; the op-only explicit padding is
        applied by torch_reference, so the layer gets padding 0."""
        import matterhorn_pytorch as mth
        kwargs = dict(self.kwargs, padding=0) if self.padding else self.kwargs
        ours = extras.pop("ours", True)
        return getattr(mth.snn if ours else torch.nn, self.name)(**kwargs, dtype=dtype or self.dtype, device=device,
                                                                 **extras)

    def op_args(self, device="cpu", dtype=None, requires_grad=None):
        """(op, args) for torch.ops.matterhorn with fresh random values."""
        dtype, requires_grad = dtype or self.dtype, self.requires_grad if requires_grad is None else requires_grad
        layer = self.module(dtype, device)
        weight = layer.weight.detach().clone().requires_grad_(requires_grad)
        bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(requires_grad)
        x = make(*self.leading, self.kwargs["in_channels"], *self.size, dtype=dtype, device=device,
                 requires_grad=requires_grad)
        if self.transposed:
            output_size = list(self.output_size) if self.output_size else None
            return torch.ops.matterhorn.conv_transpose.default, (
                x, weight, bias, list(layer.stride), list(layer.padding), list(layer.output_padding), layer.groups,
                list(layer.dilation), output_size)
        padding = list(self.padding) if self.padding else layer.explicit_padding
        return torch.ops.matterhorn.conv.default, (
            x, weight, bias, list(layer.stride), padding, list(layer.dilation), layer.groups, layer.padding_mode)

    def torch_reference(self, x, weight, bias):
        """torch.nn's layer on the folded tensor, with these weights."""
        layer = self.module(x.dtype, x.device, ours=False)
        folded = x.flatten(0, 1) if x.dim() == len(self.size) + 3 else x
        if self.padding:  # as torch.nn pads for a padding_mode: F.pad, last dimension first
            pairs = [self.padding[2 * i:2 * i + 2] for i in reversed(range(len(self.size)))]
            mode = self.kwargs.get("padding_mode", "zeros")
            folded = torch.nn.functional.pad(folded, [p for pair in pairs for p in pair],
                                             mode="constant" if mode == "zeros" else mode)
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        extra = {"output_size": list(self.output_size)} if self.output_size else {}
        y = torch.func.functional_call(layer, params, (folded,), extra)
        return y.unflatten(0, x.shape[:2]) if folded is not x else y


def _conv(name, size, leading=(2, 2), **kwargs):
    fields = {k: kwargs.pop(k) for k in ("dtype", "requires_grad", "padding_", "output_size", "gradcheck", "aot")
              if k in kwargs}
    if "padding_" in fields:
        fields["padding"] = fields.pop("padding_")
    return ConvSample(name, kwargs, size, leading, **fields)


# every option of torch.nn, odd sizes, groups > 1, dilation > 1, stride > 1, 'same' with even
# kernels, every padding_mode, asymmetric explicit padding, output_size, float64 and no gradients
CONV_SAMPLES = [
    _conv("Conv1d", (11,), in_channels=3, out_channels=4, kernel_size=3),
    _conv("Conv1d", (13,), in_channels=2, out_channels=4, kernel_size=3, stride=2, padding=1, dilation=2),
    _conv("Conv1d", (9,), in_channels=4, out_channels=6, kernel_size=4, padding="same", padding_mode="reflect", groups=2),
    _conv("Conv1d", (7,), in_channels=3, out_channels=3, kernel_size=2, padding="valid", bias=False),
    _conv("Conv1d", (9,), (3, 2), in_channels=4, out_channels=6, kernel_size=3, padding=1, aot=True),
    _conv("Conv1d", (5,), (1, 2), in_channels=2, out_channels=2, kernel_size=3, padding=1, padding_mode="reflect",
          gradcheck=True),
    _conv("Conv2d", (7, 9), in_channels=3, out_channels=5, kernel_size=3, padding=1),
    _conv("Conv2d", (7, 8), in_channels=4, out_channels=6, kernel_size=(2, 3), stride=(2, 1), padding=(1, 0),
          dilation=(1, 2), groups=2, padding_mode="replicate"),
    _conv("Conv2d", (9, 10), in_channels=2, out_channels=3, kernel_size=4, padding="same", dilation=2,
          padding_mode="circular"),
    _conv("Conv2d", (5, 6), in_channels=3, out_channels=2, kernel_size=3, padding=2, padding_mode="reflect", bias=False),
    _conv("Conv2d", (5, 5), in_channels=2, out_channels=4, kernel_size=2, padding="same"),
    _conv("Conv2d", (7, 8), (3, 2), in_channels=4, out_channels=4, kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2),
          groups=2, padding_mode="reflect", bias=False, padding_=(1, 2, 0, 1), aot=True),
    _conv("Conv2d", (6, 5), (2,), in_channels=4, out_channels=3, kernel_size=3, padding=1, padding_mode="circular",
          requires_grad=False, aot=True),
    _conv("Conv2d", (4, 3), (1, 2), in_channels=2, out_channels=4, kernel_size=2, padding="same", groups=2, gradcheck=True),
    _conv("Conv3d", (4, 5, 6), in_channels=2, out_channels=3, kernel_size=3, padding=1),
    _conv("Conv3d", (3, 7, 5), in_channels=4, out_channels=2, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1),
          groups=2, padding_mode="circular"),
    _conv("Conv3d", (3, 4, 5), in_channels=2, out_channels=2, kernel_size=2, padding="same", padding_mode="replicate"),
    _conv("Conv3d", (3, 4, 5), in_channels=1, out_channels=2, kernel_size=2, padding="same", padding_mode="replicate",
          bias=False, dtype=torch.float64, aot=True),
    _conv("Conv3d", (2, 3, 2), (1, 2), in_channels=1, out_channels=2, kernel_size=2, padding=1, padding_mode="circular",
          gradcheck=True),
    _conv("ConvTranspose1d", (7,), in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1, output_padding=1),
    _conv("ConvTranspose1d", (5,), in_channels=4, out_channels=2, kernel_size=4, groups=2, dilation=2, bias=False),
    _conv("ConvTranspose1d", (5,), (3, 2), in_channels=4, out_channels=3, kernel_size=3, stride=2, padding=1,
          output_padding=1, aot=True),
    _conv("ConvTranspose1d", (3,), (1, 2), in_channels=2, out_channels=2, kernel_size=3, stride=2, output_padding=1,
          gradcheck=True),
    _conv("ConvTranspose2d", (5, 6), in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, output_padding=1,
          groups=2),
    _conv("ConvTranspose2d", (4, 5), in_channels=2, out_channels=3, kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1)),
    _conv("ConvTranspose2d", (5, 6), in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, groups=2,
          output_size=(10, 12), aot=True),
    _conv("ConvTranspose2d", (2, 3), (1, 2), in_channels=2, out_channels=2, kernel_size=2, stride=2, dilation=2, gradcheck=True),
    _conv("ConvTranspose3d", (3, 4, 3), in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1,
          output_padding=(1, 0, 1)),
    _conv("ConvTranspose3d", (3, 3, 4), in_channels=4, out_channels=2, kernel_size=2, groups=2, bias=False),
    _conv("ConvTranspose3d", (3, 3, 3), (2, 3), in_channels=2, out_channels=2, kernel_size=2, bias=False,
          dtype=torch.float64, aot=True),
    _conv("ConvTranspose3d", (2, 2, 2), (1, 2), in_channels=2, out_channels=2, kernel_size=2, groups=2, gradcheck=True),
]


# ---- linear -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearSample:
    """One matterhorn::linear call: the input's shape (the last size is in_features), the
    output features, and which of input, weight and bias need a gradient ("xwb")."""

    shape: tuple
    out_features: int
    bias: bool = True
    dtype: torch.dtype = torch.float32
    grad: str = "xwb"
    gradcheck: bool = False  # small enough for float64 gradcheck and gradgradcheck
    aot: bool = False  # opcheck through AOTAutograd too

    @property
    def id(self):
        extras = [str(self.dtype)[6:]] if self.dtype != torch.float32 else []
        return "-".join([f"{'x'.join(map(str, self.shape))}to{self.out_features}", "bias" if self.bias else "no-bias",
                         f"grad={self.grad or 'none'}", *extras])

    def op_args(self, device="cpu", dtype=None, grad=None):
        dtype, grad = dtype or self.dtype, self.grad if grad is None else grad
        x = make(*self.shape, dtype=dtype, device=device, requires_grad="x" in grad)
        w = make(self.out_features, self.shape[-1], dtype=dtype, device=device, requires_grad="w" in grad)
        b = make(self.out_features, dtype=dtype, device=device, requires_grad="b" in grad) if self.bias else None
        return torch.ops.matterhorn.linear.default, (x, w, b)

    def torch_reference(self, x, weight, bias):
        """torch.nn.Linear on the folded [N, in_features] tensor, with these parameters."""
        layer = torch.nn.Linear(self.shape[-1], self.out_features, bias=bias is not None, device="meta")
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        y = torch.func.functional_call(layer, params, (x.reshape(-1, self.shape[-1]),))
        return y.reshape(*x.shape[:-1], self.out_features)


LINEAR_SAMPLES = [
    *(LinearSample(shape, 6, bias) for shape in [(7,), (5, 7), (3, 5, 7), (3, 2, 4, 7), (2, 3, 2, 2, 7)]
      for bias in (True, False)),  # 1-D to 5-D
    LinearSample((4, 8, 16), 10, grad="", aot=True),
    LinearSample((4, 8, 16), 10, aot=True),
    LinearSample((8, 16), 10, bias=False, aot=True),
    LinearSample((16,), 3, grad="xw", aot=True),
    LinearSample((2, 3, 4, 5), 6, dtype=torch.float64, aot=True),
    LinearSample((3, 2, 5), 4, gradcheck=True),
    LinearSample((3, 2, 5), 4, bias=False, gradcheck=True),
]


# ---- the normalizations: ops called with explicit arguments -----------------------------------

@dataclass(frozen=True)
class OpSample:
    """One call of torch.ops.matterhorn.<op>: ``build(device)`` makes fresh arguments (in-place
    arguments included); ``reference(*args)`` computes what the call must return (a tuple) in
    float64 from float64 copies, with torch.nn or a formula; after the call, the in-place
    arguments must equal what the reference left in its copies. ``n``: the longest sum in the
    op (values per channel or per row), which bounds float32's rounding."""

    op: str
    build: object
    reference: object
    n: int
    id: str
    gradcheck: bool = False  # float64, small: gradcheck, forward AD and gradgradcheck of the first output

    @property
    def overload(self):
        return getattr(torch.ops.matterhorn, self.op).default


def float64_copies(args):
    """The arguments with each tensor copied to float64 (integers kept), gradients as requested."""
    def copy(a):
        if not isinstance(a, torch.Tensor):
            return a
        c = a.detach().clone()
        c = c.double() if c.is_floating_point() else c
        return c.requires_grad_(a.requires_grad)
    return [copy(a) for a in args]


def _per_group(x, groups):
    """[N, C, ...] -> [G, C, values]: the values each (group, channel) statistic covers."""
    n, c = x.shape[:2]
    return x.reshape(groups, n // groups, c, -1).transpose(1, 2).reshape(groups, c, -1)


def _from_groups(v, like):
    """[G, C, values] -> the shape of like ([N, C, ...])."""
    groups, c = v.shape[:2]
    return v.reshape(groups, c, like.shape[0] // groups, -1).transpose(1, 2).reshape(like.shape)


def _bn_stats(x, groups):
    xs = _per_group(x, groups)
    return xs.mean(-1), xs.var(-1, unbiased=False)


# Per-(group, channel) values are [G, C] or shared ([C], [1, C]): t[..., None] broadcasts over
# [G, C, values] either way; a scale is [G].
def _bn_elemt(x, mean, var, weight, bias, eps, groups, scale=None):
    xs = _per_group(x, groups)
    y = (xs - mean[..., None]) * (var[..., None] + eps).rsqrt()
    y = y * weight[..., None] if weight is not None else y
    y = y + bias[..., None] if bias is not None else y
    y = y * scale[:, None, None] if scale is not None else y
    return (_from_groups(y, x),)


def _bn_backward_reduce(dy, x, mean, groups):
    dys, xs = _per_group(dy, groups), _per_group(x, groups)
    return dys.sum(-1), (dys * (xs - mean[..., None])).sum(-1)


def _bn_backward_elemt(dy, x, mean, var, weight, sum_dy, sum_dy_xmu, eps, count, groups, scale=None):
    dys, xs = _per_group(dy, groups), _per_group(x, groups)
    dys = dys * scale[:, None, None] if scale is not None else dys
    invstd = (var[..., None] + eps).rsqrt()
    dx = (dys - sum_dy[..., None] / count - (xs - mean[..., None]) * invstd ** 2 * sum_dy_xmu[..., None] / count) * invstd
    dx = dx * weight[..., None] if weight is not None else dx
    return (_from_groups(dx, x),)


def _bn_update_stats(mean, var, count, running_mean, running_var, num_batches_tracked, momentum):
    """[C] running statistics: one torch.nn BatchNorm update per group, in order; [G, C] ones: row g
    from group g, one batch counted. The unbiased variance of count values."""
    rows = running_mean.dim() == 2
    with torch.no_grad():
        for g in range(1 if rows else mean.shape[0]):
            if num_batches_tracked is not None:
                num_batches_tracked += 1
            factor = momentum if momentum is not None else 1 / int(num_batches_tracked)
            m, v = (mean, var) if rows else (mean[g], var[g])
            running_mean.mul_(1 - factor).add_(factor * m)
            running_var.mul_(1 - factor).add_(factor * v * count / (count - 1))
    return ()


def _bn_normalize(x, weight, bias, running_mean, running_var, batch_statistics, eps, groups, scale=None):
    steps = groups if scale is None else scale.shape[0]
    if batch_statistics:
        mean, var = _bn_stats(x, groups)
    else:
        mean, var = running_mean.reshape(-1, x.shape[1]), running_var.reshape(-1, x.shape[1])
    y = _bn_elemt(x, mean, var, weight, bias, eps, steps, scale)[0]
    return (y, mean, var) if batch_statistics else (y, x.new_empty(0), x.new_empty(0))


def _bn_core(x, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, groups=1,
             scale=None):
    """The core op on the folded tensor, in formulas: statistics per group, the update of
    _bn_update_stats, the element pass per scale group."""
    batch_statistics = training or running_mean is None
    y, mean, var = _bn_normalize(x, weight, bias, running_mean, running_var, batch_statistics, eps, groups, scale)
    if training and running_mean is not None:
        _bn_update_stats(mean, var, x.numel() // mean.numel(), running_mean, running_var, num_batches_tracked,
                         momentum)
    return (y,)


def _bn_layer(x, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, layer,
              num_features, multi_step_mode, per_step=False, batch_first=False):
    """torch.nn's BatchNorm on the folded tensor (per step: one call per time step)."""
    nn_layer = getattr(torch.nn, layer)(num_features, eps=eps, momentum=momentum, affine=False,
                                        track_running_stats=running_mean is not None, dtype=x.dtype)
    with torch.no_grad():
        if running_mean is not None:
            nn_layer.running_mean, nn_layer.running_var = running_mean, running_var  # updated in place, as ours
            nn_layer.num_batches_tracked = num_batches_tracked if num_batches_tracked is not None else torch.tensor(0)
    nn_layer.train(training)

    def affine(y):
        shape = (-1,) + (1,) * (y.dim() - 2)
        y = y * weight.view(shape) if weight is not None else y
        return y + bias.view(shape) if bias is not None else y

    if not multi_step_mode:
        return (affine(nn_layer(x)),)
    steps = x.transpose(0, 1) if batch_first else x  # [T, B, ...]
    if per_step:
        y = torch.stack([affine(nn_layer(step)) for step in steps])
    else:
        y = affine(nn_layer(steps.flatten(0, 1))).unflatten(0, steps.shape[:2])
    return (y.transpose(0, 1) if batch_first else y,)


def _running(C, device="cpu", dtype=torch.float32, groups=None):
    rows = (C,) if groups is None else (groups, C)
    return (make(*rows, dtype=dtype, device=device) * 0.1, make(*rows, dtype=dtype, device=device, positive=True),
            torch.tensor(3, device=device))


def _t(*shape, grad=False, dtype=torch.float32, positive=False):
    return lambda device: make(*shape, dtype=dtype, device=device, requires_grad=grad, positive=positive)


def _sample(op, reference, n, sid, *parts, gradcheck=False):
    """parts: values, or functions of the device (a tensor, or several if marked so)."""
    def build(device):
        args = []
        for part in parts:
            if callable(part):
                value = part(device)
                args.extend(value if getattr(part, "several", False) else [value])
            else:
                args.append(part)
        return tuple(args)
    return OpSample(op, build, reference, n, sid, gradcheck)


def _several(function):
    function.several = True
    return function


_C = 3
# One list for every BatchNorm op: the layer op, the core (groups, per-group parameters and
# running statistics, a scale), and the building blocks.
BATCH_NORM_SAMPLES = [
    _sample("batch_norm_layer", _bn_layer, 2 * 4 * 25, "training-2d",
            _t(2, 4, _C, 5, 5, grad=True), _t(_C, grad=True), _t(_C, grad=True), _several(lambda d: _running(_C, d)),
            True, 0.1, 1e-5, "BatchNorm2d", _C, True, False, False),
    _sample("batch_norm_layer", _bn_layer, 2 * 5, "per-step-batch-first-cumulative-no-affine",
            _t(2, 4, _C, 5, grad=True), None, None, _several(lambda d: _running(_C, d)),
            True, None, 1e-5, "BatchNorm1d", _C, True, True, True),
    _sample("batch_norm_layer", _bn_layer, 4 * 6, "eval-single-step",
            _t(4, _C, 6, grad=True), _t(_C), _t(_C), _several(lambda d: _running(_C, d)),
            False, 0.1, 1e-5, "BatchNorm1d", _C, False, False, False),
    _sample("batch_norm", _bn_core, 8 * 25, "training",
            _t(8, _C, 5, 5, grad=True), _t(_C, grad=True), _t(_C, grad=True), _several(lambda d: _running(_C, d)),
            True, 0.1, 1e-5, 1),
    _sample("batch_norm", _bn_core, 4 * 5, "2-groups-cumulative-no-affine",
            _t(8, _C, 5, grad=True), None, None, _several(lambda d: _running(_C, d)), True, None, 1e-5, 2),
    _sample("batch_norm", _bn_core, 6 * 4, "scale-per-group",
            _t(6, _C, 4, grad=True), _t(_C, grad=True), _t(_C, grad=True), _several(lambda d: _running(_C, d)),
            True, 0.1, 1e-5, 1, _t(3, grad=True)),
    _sample("batch_norm", _bn_core, 2 * 4, "per-group-weight-and-running-statistics",
            _t(6, _C, 4, grad=True), _t(3, _C, grad=True), None, _several(lambda d: _running(_C, d, groups=3)),
            True, 0.1, 1e-5, 3),
    _sample("batch_norm", _bn_core, 1, "per-group-eval-scaled",
            _t(6, _C, 2, grad=True), _t(3, _C, grad=True), _t(3, _C, grad=True),
            _several(lambda d: _running(_C, d, groups=3)), False, 0.1, 1e-5, 3, _t(3, grad=True)),
    _sample("batch_norm_normalize", _bn_normalize, 4 * 4 * 4, "batch-statistics",
            _t(8, _C, 4, 4, grad=True), _t(_C, grad=True), _t(_C, grad=True), None, None, True, 1e-5, 2),
    _sample("batch_norm_normalize", _bn_normalize, 1, "running-statistics-float64",
            _t(8, _C, grad=True, dtype=torch.float64), _t(_C, dtype=torch.float64), None,
            _t(_C, dtype=torch.float64), _t(_C, dtype=torch.float64, positive=True), False, 1e-5, 1, gradcheck=True),
    _sample("batch_norm_normalize", _bn_normalize, 6 * 2, "scale-float64",
            _t(6, _C, 2, grad=True, dtype=torch.float64), _t(_C, grad=True, dtype=torch.float64),
            _t(_C, grad=True, dtype=torch.float64), None, None, True, 1e-5, 1,
            _t(3, grad=True, dtype=torch.float64), gradcheck=True),
    _sample("batch_norm_normalize", _bn_normalize, 2 * 2, "per-group-weight-float64",
            _t(6, _C, 2, grad=True, dtype=torch.float64), _t(3, _C, grad=True, dtype=torch.float64), None, None,
            None, True, 1e-5, 3, gradcheck=True),
    _sample("batch_norm_stats", _bn_stats, 2 * 20, "3-groups", _t(6, _C, 4, 5), 3),
    _sample("batch_norm_elemt", _bn_elemt, 1, "2-groups", _t(6, _C, 4), _t(2, _C), _t(2, _C, positive=True), _t(_C), _t(_C),
            1e-5, 2),
    _sample("batch_norm_elemt", _bn_elemt, 1, "no-affine", _t(6, _C, 4, 3), _t(1, _C), _t(1, _C, positive=True), None, None,
            1e-3, 1),
    _sample("batch_norm_elemt", _bn_elemt, 1, "shared-statistics-per-group-affine-scale", _t(6, _C, 4), _t(_C),
            _t(1, _C, positive=True), _t(3, _C), _t(3, _C), 1e-5, 3, _t(3)),
    _sample("batch_norm_backward_reduce", _bn_backward_reduce, 24, "1-group", _t(6, _C, 4), _t(6, _C, 4), _t(1, _C), 1),
    _sample("batch_norm_backward_reduce", _bn_backward_reduce, 8, "shared-mean-3-groups", _t(6, _C, 4), _t(6, _C, 4),
            _t(_C), 3),
    _sample("batch_norm_backward_elemt", _bn_backward_elemt, 1, "3-groups",
            _t(6, _C, 4), _t(6, _C, 4), _t(3, _C), _t(3, _C, positive=True), _t(_C), _t(3, _C), _t(3, _C), 1e-5, 8, 3),
    _sample("batch_norm_backward_elemt", _bn_backward_elemt, 1, "shared-statistics-scale",
            _t(6, _C, 4), _t(6, _C, 4), _t(1, _C), _t(1, _C, positive=True), _t(_C), _t(1, _C), _t(1, _C), 1e-5, 24, 3,
            _t(3)),
    _sample("batch_norm_update_stats", _bn_update_stats, 1, "2-groups",
            _t(2, _C), _t(2, _C, positive=True), 10, _several(lambda d: _running(_C, d)), 0.1),
    _sample("batch_norm_update_stats", _bn_update_stats, 1, "cumulative",
            _t(2, _C), _t(2, _C, positive=True), 10, _several(lambda d: _running(_C, d)), None),
    _sample("batch_norm_update_stats", _bn_update_stats, 1, "rows-cumulative",
            _t(2, _C), _t(2, _C, positive=True), 10, _several(lambda d: _running(_C, d, groups=2)), None),
]


def check_against_reference(sample, device):
    """Run the sample and its reference; outputs, in-place updates and the gradients of the
    arguments that need them agree to float32's rounding of sums over sample.n terms."""
    args = sample.build(device)
    copies = float64_copies(args)
    outputs = sample.overload(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,) if outputs is not None else ()
    expected = sample.reference(*copies)
    assert len(outputs) == len(expected)
    pairs = list(zip(outputs, expected)) + [(a, c) for a, c in zip(args, copies) if isinstance(a, torch.Tensor)]
    differentiable = [(a, c) for a, c in zip(args, copies) if isinstance(a, torch.Tensor) and a.requires_grad]
    if differentiable:
        grad = torch.randn_like(outputs[0])
        ours = torch.autograd.grad(outputs[0], [a for a, _ in differentiable], grad)
        theirs = torch.autograd.grad(expected[0], [c for _, c in differentiable], grad.double())
        pairs += list(zip(ours, theirs))
    dtype = args[0].dtype
    # float32 accumulation for float32 and half precision (then one rounding to dtype); a few
    # roundings even without a sum
    eps = sum_error(max(sample.n, 4), torch.float64 if dtype == torch.float64 else torch.float32)
    eps += rounding(dtype) if dtype in (torch.float16, torch.bfloat16) else 0
    for i, (a, b) in enumerate(pairs):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        if not a.is_floating_point():
            assert torch.equal(a.cpu(), b.cpu()), i
            continue
        scale = b.detach().abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a.detach().double(), b.detach().to(a.device), rtol=eps, atol=eps * (1 + scale),
                                   msg=lambda m: f"result {i}: {m}")


def check_no_derivative(sample, device):
    """A building block without a derivative: a backward through it raises, naming the op (torch's
    default would warn and give no gradient)."""
    args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in sample.build(device)]
    outputs = sample.overload(*args)
    output = outputs[0] if isinstance(outputs, tuple) else outputs
    with pytest.raises(RuntimeError, match=f"derivative for matterhorn::{sample.op} is not implemented"):
        output.sum().backward()


def _ln_rows(x, normalized_shape):
    """[rows..., normalized...] -> [rows..., N]"""
    return x.reshape(*x.shape[:x.dim() - len(normalized_shape)], -1)


def _ln_layer(x, normalized_shape, weight, bias, eps):
    return (torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps),)


def _ln_normalize(x, normalized_shape, weight, bias, eps):
    rows = _ln_rows(x, normalized_shape)
    return (torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps), rows.mean(-1),
            (rows.var(-1, unbiased=False) + eps).rsqrt())


def _ln_backward(grad_output, x, normalized_shape, mean, rstd, weight):
    """The input gradient for the given statistics; the parameters' gradients sum over rows."""
    g, rows = _ln_rows(grad_output, normalized_shape), _ln_rows(x, normalized_shape)
    xhat = (rows - mean[..., None]) * rstd[..., None]
    gw = g * weight.reshape(-1) if weight is not None else g
    dx = rstd[..., None] * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
    if weight is None:
        return dx.reshape(x.shape), x.new_empty(0), x.new_empty(0)
    n = g.shape[-1]
    return (dx.reshape(x.shape), (g * xhat).reshape(-1, n).sum(0).reshape(weight.shape),
            g.reshape(-1, n).sum(0).reshape(weight.shape))


def _ln_stats(*rows):
    return _several(lambda device: (make(*rows, device=device), make(*rows, device=device, positive=True)))


_F64 = torch.float64
LAYER_NORM_SAMPLES = [
    _sample("layer_norm", _ln_layer, 20, "affine", _t(3, 2, 4, 5, grad=True), [4, 5], _t(4, 5, grad=True),
            _t(4, 5, grad=True), 1e-5),
    _sample("layer_norm", _ln_layer, 6, "no-affine", _t(3, 2, 6, grad=True), [6], None, None, 1e-5),
    _sample("layer_norm_normalize", _ln_normalize, 6, "weight", _t(3, 2, 6, grad=True), [6], _t(6, grad=True), None, 1e-5),
    _sample("layer_norm_normalize", _ln_normalize, 5, "bfloat16-bias", _t(4, 5, dtype=torch.bfloat16), [5], None,
            _t(5, dtype=torch.bfloat16), 1e-3),
    _sample("layer_norm_normalize", _ln_normalize, 5, "bfloat16-input-float32-parameters",
            _t(4, 5, dtype=torch.bfloat16, grad=True), [5], _t(5, grad=True), _t(5), 1e-5),
    *(_sample("layer_norm_normalize", _ln_normalize, 20, f"float64-{params}", _t(3, 4, 5, grad=True, dtype=_F64), [4, 5],
              _t(4, 5, grad=True, dtype=_F64) if "weight" in params else None,
              _t(4, 5, grad=True, dtype=_F64) if "bias" in params else None, 1e-5, gradcheck=True)
      for params in ["weight-and-bias", "weight", "bias", "none"]),
    _sample("layer_norm_backward", _ln_backward, 6, "weight", _t(3, 2, 6), _t(3, 2, 6), [6], _ln_stats(3, 2), _t(6)),
    _sample("layer_norm_backward", _ln_backward, 12, "two-dimensions-no-weight", _t(3, 2, 6), _t(3, 2, 6), [2, 6],
            _ln_stats(3), None),
    _sample("layer_norm_backward", _ln_backward, 6, "float16",
            _t(3, 6, dtype=torch.float16), _t(3, 6, dtype=torch.float16), [6], _ln_stats(3), _t(6, dtype=torch.float16)),
]
