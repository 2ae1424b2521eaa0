"""WSLinear and WSConv1d/2d/3d (matterhorn 2.0.0's weight-standardised layers) and their op,
matterhorn::weight_standardize with its building blocks: forward and gradients against 2.0.0's
formula in float64 plain torch in both modes, gradcheck, opcheck, 2.0.0 state_dicts, errors,
TorchScript, torch.compile, torch.export and the C++ modules."""

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn as nn
from torch.utils.dlpack import from_dlpack, to_dlpack

import matterhorn_pytorch as mth
from conftest import run_model_in_cpp
from samples import DEVICES, assert_within, make, opcheck

ops = torch.ops.matterhorn
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def standardized(weight, gamma, beta, eps):
    """matterhorn 2.0.0's effective weight in float64, its mean and variance detached."""
    w = weight.double()
    rows = w.detach().flatten(1)
    shape = (w.shape[0],) + (1,) * (w.dim() - 1)
    mean = rows.mean(1).view(shape)
    denominator = (rows.var(1) * rows.shape[1]).sqrt().view(shape) + eps  # var: unbiased
    out = (w - mean) / denominator
    if gamma is not None:
        out = out * gamma.double().view(shape)
    if beta is not None:
        out = out + beta.double().view(shape)
    return out


# ---- the layers against the formula -----------------------------------------------------------

@dataclass(frozen=True)
class WSSample:
    """One layer: its class, constructor arguments and one step's input size (without B)."""

    name: str
    kwargs: dict
    size: tuple

    @property
    def id(self):
        return "-".join([self.name] + [f"{k}={v}" for k, v in self.kwargs.items()])

    def layer(self, dtype=torch.float64, **extras):
        """Ours, with gamma and beta away from their initial ones and zeros (beta is a buffer-like
        parameter: loaded from checkpoints, never trained)."""
        layer = getattr(mth.snn, self.name)(**self.kwargs, dtype=dtype, **extras)
        with torch.no_grad():
            layer.gamma.uniform_(0.5, 1.5)
            layer.beta.uniform_(-0.5, 0.5)
        return layer

    def twin(self):
        """The plain torch.nn layer (Linear, ConvNd) in float64."""
        kwargs = {k: v for k, v in self.kwargs.items() if k not in ("affine", "eps")}
        return getattr(nn, self.name[2:])(**kwargs, dtype=torch.float64)


SAMPLES = [
    WSSample("WSLinear", dict(in_features=7, out_features=5), (7,)),
    WSSample("WSLinear", dict(in_features=6, out_features=3, bias=False, affine=False, eps=1e-3), (6,)),
    WSSample("WSConv1d", dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", padding_mode="reflect"),
             (3, 9)),
    WSSample("WSConv1d", dict(in_channels=4, out_channels=6, kernel_size=2, stride=2, dilation=2, groups=2), (4, 11)),
    WSSample("WSConv2d", dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2), (4, 7, 6)),
    WSSample("WSConv2d", dict(in_channels=3, out_channels=4, kernel_size=4, padding="same", dilation=2,
                              padding_mode="circular", bias=False, eps=0.1), (3, 9, 8)),
    WSSample("WSConv3d", dict(in_channels=2, out_channels=3, kernel_size=2, padding=1, padding_mode="replicate"),
             (2, 3, 4, 5)),
    WSSample("WSConv3d", dict(in_channels=2, out_channels=2, kernel_size=(1, 3, 3), padding="same", affine=False),
             (2, 3, 4, 4)),
]

MODES = {  # the layer's extra arguments and the leading dimensions of its input
    "multi-step": (dict(), (3, 2)),
    "batch-first": (dict(batch_first=True), (2, 3)),
    "single-step": (dict(multi_time_step=False), (2,)),
}


def reference(sample, layer, x, leading):
    """The formula: torch.nn's layer on the folded float64 tensor with the standardised weight.
    Returns the output and the float64 leaves (input and parameters)."""
    leaves = {"input": x.detach().double().requires_grad_()}
    leaves.update({n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()})
    weight = standardized(leaves["weight"], leaves["gamma"], leaves["beta"], layer.eps)
    params = {"weight": weight} if "bias" not in leaves else {"weight": weight, "bias": leaves["bias"]}
    folded = leaves["input"].flatten(0, len(leading) - 1)
    y = torch.func.functional_call(sample.twin(), params, (folded,))
    return y.unflatten(0, leading), leaves


def rounding_bounds(sample, layer, x, dy, leading, u):
    """Worst-case rounding of the output and each gradient: u times the longest sum's length
    (n, standardisation included) times the sum of the terms' magnitudes, i.e. the same linear
    maps run on |x|, |standardised weight|, |bias| and |dy| in float64."""
    w = layer.weight.detach().double()
    gamma, beta = layer.gamma.detach().double(), layer.beta.detach().double()
    w_std = standardized(w, gamma, beta, layer.eps).abs()
    rows = w.flatten(1)
    shape = (-1,) + (1,) * (w.dim() - 1)
    rstd = 1 / ((rows.var(1) * rows.shape[1]).sqrt() + layer.eps)
    mean = rows.mean(1).view(shape)
    w_hat = ((w - mean).abs() + mean.abs()) * rstd.view(shape)  # |w - mean| rounds relative to this
    twin = sample.twin()
    ax = x.detach().double().abs().flatten(0, len(leading) - 1).requires_grad_()
    aw = w_std.clone().requires_grad_()
    ab = torch.zeros(w.shape[0], dtype=torch.float64, requires_grad=True)
    params = {"weight": aw, "bias": ab} if layer.bias is not None else {"weight": aw}
    y = torch.func.functional_call(twin, params, (ax,))
    if layer.bias is not None:
        y = y + layer.bias.detach().double().abs().view((-1,) + (1,) * (y.dim() - 2))
    dy_abs = dy.detach().double().abs().flatten(0, len(leading) - 1)
    grads = torch.autograd.grad(y, [ax, aw] + ([ab] if layer.bias is not None else []), dy_abs)
    n = w.numel() + dy.numel() // w.shape[0] + 8  # every sum here has fewer terms
    bound = {"output": y.detach().unflatten(0, leading), "input": grads[0].unflatten(0, leading),
             "weight": grads[1] * (gamma.abs() * rstd).view(shape),
             "gamma": (grads[1] * w_hat).flatten(1).sum(1)}
    if layer.bias is not None:
        bound["bias"] = grads[2]
    return {k: u * n * v for k, v in bound.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.id)
def test_layer_equals_the_formula_forward_and_gradients(sample, mode, dtype):
    extras, leading = MODES[mode]
    layer = sample.layer(dtype, **extras)
    x = make(*leading, *sample.size, dtype=dtype, requires_grad=True)
    y = layer(x)
    expected, leaves = reference(sample, layer, x, leading)
    dy = torch.randn_like(y)
    y.backward(dy)
    bounds = rounding_bounds(sample, layer, x, dy, leading, torch.finfo(dtype).eps)
    assert y.dtype == dtype
    assert_within(y, expected, bounds["output"], "output")
    names = ["input", "weight", "bias"] + (["gamma"] if layer.affine else [])
    names = [n for n in names if n in leaves]
    expected_grads = torch.autograd.grad(expected, [leaves[n] for n in names], dy.double())
    ours = {"input": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    for name, grad in zip(names, expected_grads):
        assert ours[name] is not None, f"no gradient for {name}"
        assert_within(ours[name], grad, bounds[name], f"gradient of {name}")
    assert layer.beta.grad is None and not layer.beta.requires_grad  # beta is never trained
    assert layer.gamma.requires_grad == layer.affine and (layer.affine or layer.gamma.grad is None)


@pytest.mark.parametrize("sample", SAMPLES[::2], ids=lambda s: s.id)
def test_layer_gradcheck_float64(sample):
    """In x, gamma, beta and bias, forward mode too. Not in the weight: 2.0.0's mean and variance
    are constants to autograd, which finite differences of the weight cannot see (the formula test
    covers it). Second derivatives: the op's gradgradcheck (the folded ops' are torch's own)."""
    layer = sample.layer()
    size = tuple(min(3, s) for s in sample.size[1:])  # a smaller input: gradcheck is O(n^2)
    x = make(2, 1, sample.size[0], *size, dtype=torch.float64, requires_grad=True)
    params = {n: p.detach().clone().requires_grad_(n != "weight") for n, p in layer.named_parameters()}
    differentiable = [n for n in params if n != "weight"]

    def run(x, *values):
        return torch.func.functional_call(layer, {**params, **dict(zip(differentiable, values))}, (x,))

    inputs = (x, *(params[n] for n in differentiable))
    assert torch.autograd.gradcheck(run, inputs, check_forward_ad=True)


def test_forward_mode_ad_and_create_graph_backward_treat_the_statistics_as_constants():
    """Both take the ATen formulation (weight_standardize_*_aten), not the kernels."""
    w = make(4, 3, 2, dtype=torch.float64)
    gamma, beta = make(4, dtype=torch.float64, positive=True), make(4, dtype=torch.float64)
    tangents = tuple(torch.randn_like(t) for t in (w, gamma, beta))
    _, ours = torch.func.jvp(lambda *a: ops.weight_standardize(*a, 1e-3), (w, gamma, beta), tangents)
    _, expected = torch.func.jvp(lambda *a: standardized(*a, 1e-3), (w, gamma, beta), tangents)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    leaves = [t.clone().requires_grad_() for t in (w, gamma, beta)]
    references = [t.clone().requires_grad_() for t in (w, gamma, beta)]
    dy = torch.randn_like(w)
    grads = torch.autograd.grad(ops.weight_standardize(*leaves, 1e-3), leaves, dy, create_graph=True)
    expected_grads = torch.autograd.grad(standardized(*references, 1e-3), references, dy, create_graph=True)
    assert grads[0].requires_grad and grads[1].requires_grad  # on gamma and on the weight
    for ours_g, expected_g in zip(grads, expected_grads):
        torch.testing.assert_close(ours_g, expected_g, rtol=1e-12, atol=1e-12)
    # the second derivatives too: the weight's gradient depends on gamma, gamma's on the weight
    probe = [torch.randn_like(g) for g in grads]
    second = torch.autograd.grad(sum((g * p).sum() for g, p in zip(grads, probe)), leaves[:2])
    expected_second = torch.autograd.grad(sum((g * p).sum() for g, p in zip(expected_grads, probe)), references[:2])
    for a, b in zip(second, expected_second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_no_graph_without_gradients_and_the_weight_is_saved_for_backward():
    layer = mth.snn.WSConv2d(2, 3, 3)
    x = torch.randn(2, 2, 2, 5, 5)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    y = layer(x)
    with torch.no_grad():
        layer.weight.add_(1)  # an optimizer step between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_one_op_call_per_forward_whatever_t_and_b():
    """The weight is standardised once per call, not per time step, and the activations go
    through the folded op only once."""
    layer = mth.snn.WSConv2d(2, 3, 3, padding=1)
    with torch.autograd.profiler.profile(record_shapes=False) as profile:
        layer(torch.randn(5, 4, 2, 6, 6))
    calls = [e.name for e in profile.function_events]
    assert calls.count("matterhorn::weight_standardize_forward") == 1
    assert calls.count("matterhorn::conv") == 1


# ---- matterhorn 2.0.0 checkpoints --------------------------------------------------------------

# state_dict keys and shapes of matterhorn 2.0.0's layers built with these arguments
MATTERHORN_2_0_0 = [
    ("WSConv2d", (3, 8, 3), {"weight": (8, 3, 3, 3), "bias": (8,), "gamma": (8,), "beta": (8,)}),
    ("WSConv1d", (4, 6, 5), {"weight": (6, 4, 5), "bias": (6,), "gamma": (6,), "beta": (6,)}),
    ("WSConv3d", (2, 4, 2), {"weight": (4, 2, 2, 2, 2), "bias": (4,), "gamma": (4,), "beta": (4,)}),
    ("WSLinear", (10, 4), {"weight": (4, 10), "bias": (4,), "gamma": (4,), "beta": (4,)}),
]


@pytest.mark.parametrize("name,args,keys", MATTERHORN_2_0_0, ids=[c[0] for c in MATTERHORN_2_0_0])
def test_a_matterhorn_2_0_0_state_dict_loads_and_gives_the_formula(name, args, keys):
    checkpoint = {k: torch.randn(shape) for k, shape in keys.items()}
    checkpoint["gamma"] = checkpoint["gamma"].abs() + 0.5
    layer = getattr(mth.snn, name)(*args)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == keys  # ours load in 2.0.0 too
    layer.load_state_dict(checkpoint)  # strict
    x = torch.randn(3, 2, *((args[0],) if name == "WSLinear" else (args[0],) + (5,) * int(name[-2])))
    weight = standardized(checkpoint["weight"], checkpoint["gamma"], checkpoint["beta"], 1e-6)
    twin = getattr(nn, name[2:])(*args, dtype=torch.float64)
    expected = torch.func.functional_call(twin, {"weight": weight, "bias": checkpoint["bias"].double()},
                                          (x.double().flatten(0, 1),)).unflatten(0, (3, 2))
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_affine_false_keeps_gamma_at_one_and_untrained():
    layer = mth.snn.WSLinear(5, 3, affine=False)
    assert not layer.gamma.requires_grad and torch.equal(layer.gamma, torch.ones(3))
    layer(torch.randn(2, 4, 5)).sum().backward()
    assert layer.gamma.grad is None and layer.beta.grad is None and layer.weight.grad is not None
    assert "affine=False" in repr(layer) and "eps=1e-06" in repr(layer)


def test_signature_and_torch_nn_base():
    import inspect
    assert issubclass(mth.snn.WSConv2d, (mth.snn.Conv2d, nn.Conv2d)) and issubclass(mth.snn.WSLinear, nn.Linear)
    names = list(inspect.signature(mth.snn.WSConv3d).parameters)
    assert names == ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
                     "padding_mode", "affine", "eps", "device", "dtype", "multi_time_step", "batch_first", "spike_input"]
    assert list(inspect.signature(mth.snn.WSLinear).parameters) == [
        "in_features", "out_features", "bias", "affine", "eps", "device", "dtype", "multi_time_step", "batch_first",
        "spike_input"]
    layer = mth.snn.WSConv1d(2, 4, 3, 1, 0, 1, 1, True, "zeros", False, 1e-4, None, torch.float64)  # positional
    assert not layer.affine and layer.eps == 1e-4 and layer.gamma.dtype == torch.float64


# ---- the op -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpSample:
    shape: tuple
    gamma: bool = True
    beta: bool = True
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"  # or channels_last, transposed (rows not dense), offset (a large common value)

    @property
    def id(self):
        return "x".join(map(str, self.shape)) + f"-{self.layout}-{str(self.dtype)[6:]}" + \
            ("-gamma" if self.gamma else "") + ("-beta" if self.beta else "")

    def build(self, device="cpu", requires_grad=True):
        if self.layout == "transposed":
            w = make(*reversed(self.shape), dtype=self.dtype, device=device).t()
        else:
            w = make(*self.shape, dtype=self.dtype, device=device)
        if self.layout == "channels_last":
            w = w.to(memory_format=torch.channels_last)
        if self.layout == "offset":  # cancellation: the mean is far larger than the spread
            w = w + 1000
        gamma = make(self.shape[0], dtype=self.dtype, device=device, positive=True) if self.gamma else None
        beta = make(self.shape[0], dtype=self.dtype, device=device) if self.beta else None
        floating = self.dtype in (torch.float32, torch.float64)
        leaves = [t if t is None else t.requires_grad_(requires_grad and floating) for t in (w, gamma, beta)]
        return leaves


OP_SAMPLES = [
    OpSample((5, 7)),
    OpSample((4, 3, 3), gamma=False, beta=False, dtype=torch.float64),
    OpSample((6, 2, 3, 3), beta=False, layout="channels_last"),
    OpSample((3, 2, 2, 2, 2), dtype=torch.float64),
    OpSample((7, 5), layout="transposed"),
    OpSample((3, 20000), layout="offset"),
    OpSample((8, 4, 3), dtype=torch.bfloat16),
    OpSample((8, 4, 3), dtype=torch.float16, layout="channels_last" if False else "contiguous"),
    OpSample((0, 3)),
    OpSample((4, 0, 2)),
]


def op_bound(w, gamma, beta, out64, dtype):
    """The output's rounding: the statistics of K values in the accumulation type (float32, or
    float64) relative to each value's distance from the mean plus the mean (a value far from
    zero cancels), then one rounding to dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = w.detach().double().flatten(1)
    K = max(rows.shape[1], 1)
    shape = (w.shape[0],) + (1,) * (w.dim() - 1)
    rstd = 1 / ((rows.var(1) * K).sqrt() + 0).view(shape) if rows.numel() else torch.ones(shape, dtype=torch.float64)
    g = gamma.detach().double().abs().view(shape) if gamma is not None else 1
    scale = (w.detach().double().abs() + rows.abs().mean(1).view(shape)) * rstd * g
    return torch.finfo(acc).eps * 4 * (K + 4) * scale + torch.finfo(dtype).eps * out64.abs()


@pytest.mark.filterwarnings(r"ignore:var\(\)")  # the reference on no values
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", OP_SAMPLES, ids=lambda s: s.id)
def test_op_equals_the_formula_and_keeps_the_weight_layout(sample, device):
    w, gamma, beta = sample.build(device)
    out = ops.weight_standardize(w, gamma, beta, 1e-6)
    expected = standardized(w, gamma, beta, 1e-6)
    assert out.dtype == w.dtype and out.shape == w.shape
    if sample.layout == "channels_last":
        assert out.stride() == w.stride()
    if sample.layout == "transposed":
        assert out.is_contiguous()
    assert_within(out.cpu(), expected.cpu(), op_bound(w.cpu(), gamma, beta, expected.cpu(), w.dtype), "output")
    if w.requires_grad and w.numel():
        dy = torch.randn_like(out)
        ours = torch.autograd.grad(out, [t for t in (w, gamma, beta) if t is not None], dy)
        leaves = [t for t in (w, gamma, beta) if t is not None]
        theirs = torch.autograd.grad(expected, leaves, dy.double())
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5 * math.sqrt(w.shape[1]), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", [s for s in OP_SAMPLES if s.dtype in (torch.float32, torch.float64)],
                         ids=lambda s: s.id)
def test_opcheck(sample, device):
    w, gamma, beta = sample.build(device)
    aot = sample.shape == (5, 7) or sample.layout == "channels_last"  # AOTAutograd: seconds a sample
    opcheck(ops.weight_standardize.default, (w, gamma, beta, 1e-5), aot=aot)
    opcheck(ops.weight_standardize_forward.default, (w, gamma, beta, 1e-5), aot=aot)
    with torch.no_grad():
        _, mean, rstd = ops.weight_standardize_forward(w, gamma, beta, 1e-5)
    dy = torch.randn_like(w)
    opcheck(ops.weight_standardize_backward.default, (dy, w.detach(), mean, rstd, gamma), aot=False)


def test_op_gradcheck_in_gamma_and_beta_and_gradgradcheck():
    w = make(3, 2, 3, dtype=torch.float64)
    gamma = make(3, dtype=torch.float64, positive=True, requires_grad=True)
    beta = make(3, dtype=torch.float64, requires_grad=True)
    run = lambda g, b: ops.weight_standardize(w, g, b, 1e-4)  # noqa: E731
    assert torch.autograd.gradcheck(run, (gamma, beta), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(run, (gamma, beta))


def test_backward_block_equals_the_formula():
    w = make(4, 3, 5, dtype=torch.float64)
    gamma = make(4, dtype=torch.float64, positive=True)
    out, mean, rstd = ops.weight_standardize_forward(w, gamma, None, 0.0)
    rows = w.flatten(1)
    torch.testing.assert_close(mean, rows.mean(1))
    torch.testing.assert_close(rstd, 1 / (rows.var(1) * rows.shape[1]).sqrt())
    dy = torch.randn_like(w)
    dw, dgamma, dbeta = ops.weight_standardize_backward(dy, w, mean, rstd, gamma)
    w_hat = (w - mean.view(-1, 1, 1)) * rstd.view(-1, 1, 1)
    torch.testing.assert_close(dw, dy * (gamma * rstd).view(-1, 1, 1))
    torch.testing.assert_close(dgamma, (dy * w_hat).sum((1, 2)))
    torch.testing.assert_close(dbeta, dy.sum((1, 2)))
    _, dgamma, _ = ops.weight_standardize_backward(dy, w, mean, rstd, None)
    assert dgamma.shape == (0,)
    with pytest.raises(RuntimeError, match="derivative for matterhorn::weight_standardize_backward is not implemented"):
        ops.weight_standardize_backward(dy.requires_grad_(), w, mean, rstd, gamma)[0].sum().backward()


def test_a_channel_of_equal_weights_divides_by_eps():
    w = torch.ones(2, 4)
    w[1] = torch.arange(4.0)
    out = ops.weight_standardize(w, None, None, 0.5)
    assert torch.equal(out[0], torch.zeros(4))  # (w - mean) / (0 + eps)
    assert torch.isnan(ops.weight_standardize(w, None, None, 0.0)[0]).all()  # 0 / 0, as the formula


class TestErrors:
    def test_layer_arguments(self):
        with pytest.raises(ValueError, match=r"^WSConv2d: eps must be a number >= 0, got -1"):
            mth.snn.WSConv2d(2, 4, 3, eps=-1)
        with pytest.raises(ValueError, match=r"^WSLinear: eps must be a number >= 0, got nan"):
            mth.snn.WSLinear(2, 4, eps=float("nan"))
        with pytest.raises(TypeError, match=r"^WSConv1d: affine must be a bool, got 'yes'"):
            mth.snn.WSConv1d(2, 4, 3, affine="yes")
        with pytest.raises(ValueError, match=r"^WSLinear: weight standardisation needs 2 or more weights per "
                                             r"output channel .*weight \[3, 1\] has 1"):
            mth.snn.WSLinear(1, 3)
        with pytest.raises(ValueError, match=r"^WSConv2d: weight standardisation needs 2 or more"):
            mth.snn.WSConv2d(2, 4, 1, groups=2)
        with pytest.raises(ValueError, match=r"^WSConv3d: in_channels must be"):
            mth.snn.WSConv3d(0, 4, 3)

    def test_layer_inputs_name_the_layer(self):
        layer = mth.snn.WSConv2d(3, 4, 3)
        with pytest.raises(TypeError, match=r"^WSConv2d: the input's dtype torch.float64 does not match the layer's "
                                            r"weight dtype torch.float32"):
            layer(torch.randn(2, 2, 3, 5, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"^WSConv2d: the input is on meta but the layer's weight is on cpu"):
            layer(torch.randn(2, 2, 3, 5, 5, device="meta"))
        with pytest.raises(ValueError, match=r"^WSConv2d\(in_channels=3\): expected input \[T, B, 3, H, W\]"):
            layer(torch.randn(2, 2, 4, 5, 5))

    # the folded op checks shape and spikes and names its base layer: the layer raises it in its own name
    @pytest.mark.parametrize("multi_time_step", [True, False], ids=["multi-step", "single-step"])
    @pytest.mark.parametrize("name,args,step,base", [("WSLinear", (6, 3), (6,), r"Linear\(in_features=6\)"),
                                                     ("WSConv2d", (3, 4, 3), (3, 5, 5), r"Conv2d\(in_channels=3\)")])
    def test_op_errors_name_the_layer(self, name, args, step, base, multi_time_step):
        leading = (2, 3) if multi_time_step else (3,)
        layer = getattr(mth.snn, name)(*args, multi_time_step=multi_time_step)
        with pytest.raises(ValueError, match=rf"^WS{base}: expected input "):
            layer(torch.randn(*leading, step[0] + 1, *step[1:]))
        spiking = getattr(mth.snn, name)(*args, multi_time_step=multi_time_step, spike_input=True)
        x = torch.randint(0, 2, (*leading, *step)).float()
        spiking(x)  # spikes pass
        x.view(-1)[1] = 0.5
        with pytest.raises(ValueError, match=rf"^{name}: spike_input=True expects an input of spikes"):
            spiking(x)

    @pytest.mark.parametrize("op", ["weight_standardize", "weight_standardize_forward"])
    def test_op_arguments(self, op):
        f = getattr(ops, op)
        w = torch.randn(4, 3)
        for args, error, message in [
            ((torch.randn(4), None, None, 1e-6), ValueError, r"expected a weight \[out, in, \.\.\.\] of 2 or more dimensions, got \[4\]"),
            ((torch.randn(4, 1, 1), None, None, 1e-6), ValueError, r"an unbiased variance needs 2 or more weights per output channel; got a weight \[4, 1, 1\] \(fan_in = 1\)"),
            ((torch.ones(4, 3, dtype=torch.int64), None, None, 1e-6), TypeError, r"expected a floating-point weight, got torch.int64"),
            ((w, torch.ones(5), None, 1e-6), ValueError, r"expected gamma of shape \[4\] \(one value per output channel"),
            ((w, None, torch.ones(4, 1), 1e-6), ValueError, r"expected beta of shape \[4\]"),
            ((w, torch.ones(4, dtype=torch.float64), None, 1e-6), TypeError, r"expected gamma of dtype torch.float32, got torch.float64"),
            ((w, None, torch.ones(4, device="meta"), 1e-6), ValueError, r"beta is on meta but the weight is on cpu"),
            ((w, None, None, -1e-3), ValueError, r"eps must be >= 0, got -0.001"),
            ((w.to("meta"), None, None, float("nan")), ValueError, r"eps must be >= 0, got nan"),
        ]:
            with pytest.raises(error, match=r"^weight_standardize: " + message):
                f(*args)

    def test_backward_arguments(self):
        w = torch.randn(4, 3)
        _, mean, rstd = ops.weight_standardize_forward(w, None, None, 1e-6)
        f = ops.weight_standardize_backward
        with pytest.raises(ValueError, match=r"^weight_standardize_backward: expected grad_output of the weight's shape"):
            f(torch.randn(4, 2), w, mean, rstd, None)
        with pytest.raises(TypeError, match=r"^weight_standardize_backward: expected grad_output of the weight's dtype"):
            f(torch.randn(4, 3, dtype=torch.float64), w, mean, rstd, None)
        with pytest.raises(TypeError, match=r"^weight_standardize_backward: expected rstd of dtype torch.float32"):
            f(torch.randn(4, 3), w, mean, rstd.double(), None)
        with pytest.raises(ValueError, match=r"^weight_standardize_backward: expected mean of shape \[4\]"):
            f(torch.randn(4, 3), w, mean[:3], rstd, None)


# ---- deployment: TorchScript, C++ program, torch.compile, torch.export --------------------------

class WSNet(nn.Module):
    """[T, B, 2, 6, 6] -> [T, B, 5]: WSConv2d, WSConv1d over rows, WSLinear."""

    def __init__(self):
        super().__init__()
        self.conv2d = mth.snn.WSConv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.conv1d = mth.snn.WSConv1d(4, 3, 3, padding="same", groups=1)
        self.fc = mth.snn.WSLinear(3 * 36, 5)
        with torch.no_grad():
            for layer in (self.conv2d, self.conv1d, self.fc):
                layer.gamma.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2d(x)).flatten(3)
        return self.fc(torch.relu(self.conv1d(h)).flatten(2))


@pytest.mark.parametrize("export", ["script", "trace"])
def test_torchscript_round_trip_and_cpp_program(export, tmp_path):
    model = WSNet().eval()
    x = torch.randn(3, 2, 2, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.jit.script(model) if export == "script" else torch.jit.trace(model, x)
    path = tmp_path / "model.pt"
    exported.save(str(path))
    loaded = torch.jit.load(str(path))
    for shape in [(3, 2, 2, 6, 6), (2, 4, 2, 6, 6)]:
        x = torch.randn(shape)
        torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(run_model_in_cpp(path, x, tmp_path), model(x), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_forward_and_backward_match_eager():
    eager, net = WSNet(), WSNet()
    net.load_state_dict(eager.state_dict())
    compiled = torch.compile(net, fullgraph=True)
    for shape in [(3, 2, 2, 6, 6), (2, 5, 2, 6, 6)]:
        x = torch.randn(shape)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(x, 1)
        y_eager, y_compiled = eager(x), compiled(x)
        torch.testing.assert_close(y_compiled, y_eager)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
        for (name, p), q in zip(eager.named_parameters(), net.parameters()):
            if p.grad is None:
                assert q.grad is None, name
                continue
            # float32 sums over T*B*positions terms that inductor may order otherwise
            n = x[:, :, 0].numel() * 8
            torch.testing.assert_close(q.grad, p.grad, rtol=n * 1.2e-7, atol=n * 1.2e-7 * p.grad.abs().max(), msg=name)
        eager.zero_grad(), net.zero_grad()


def test_export_with_dynamic_time_and_batch_keeps_the_op():
    model = WSNet().eval()
    T, B = torch.export.Dim("T", min=2), torch.export.Dim("B", min=2)
    exported = torch.export.export(model, (torch.randn(3, 2, 2, 6, 6),), dynamic_shapes=({0: T, 1: B},))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"matterhorn.weight_standardize.default", "matterhorn.conv.default", "matterhorn.linear.default"} <= targets
    decomposed = exported.run_decompositions()  # what AOTInductor compiles: the op's building block stays
    targets = {str(node.target) for node in decomposed.graph.nodes if node.op == "call_function"}
    assert "matterhorn.weight_standardize_forward.default" in targets, targets
    for shape in [(3, 2, 2, 6, 6), (5, 3, 2, 6, 6)]:
        x = torch.randn(shape)
        torch.testing.assert_close(exported.module()(x), model(x))
        torch.testing.assert_close(decomposed.module()(x), model(x))


# ---- the C++ modules ----------------------------------------------------------------------------

def cpp_layer(python_layer, name, args, kwargs):
    cpp = getattr(mth._C, name)(*args, **kwargs)
    cpp.load_parameters({n: to_dlpack(p.detach()) for n, p in python_layer.named_parameters()})
    assert set(cpp.named_parameters()) == {n for n, _ in python_layer.named_parameters()}
    return cpp


CPP_CASES = [
    ("WSLinear", (7, 5), dict(), (7,)),
    ("WSLinear", (6, 3), dict(bias=False, affine=False, eps=1e-3), (6,)),
    ("WSConv1d", (3, 4, [3]), dict(padding="same", padding_mode="reflect"), (3, 9)),
    ("WSConv2d", (4, 6, [3]), dict(padding=[1], groups=2, eps=1e-2), (4, 7, 6)),
    ("WSConv2d", (3, 4, [2, 3]), dict(stride=[2, 1], dilation=[1, 2], bias=False, padding_mode="circular",
                                      padding=[1, 2]), (3, 9, 8)),
    ("WSConv3d", (2, 3, [2]), dict(padding=[1], padding_mode="replicate", affine=False), (2, 3, 4, 5)),
]


@pytest.mark.parametrize("case", CPP_CASES, ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[2].values()))}")
def test_cpp_module_matches_the_python_class(case):
    name, args, kwargs, size = case
    unwrap = {k: (v[0] if isinstance(v, list) and len(v) == 1 else tuple(v) if isinstance(v, list) else v)
              for k, v in kwargs.items()}
    python_args = tuple(a[0] if isinstance(a, list) and len(a) == 1 else tuple(a) if isinstance(a, list) else a
                        for a in args)
    python_layer = getattr(mth.snn, name)(*python_args, **unwrap)
    with torch.no_grad():
        python_layer.gamma.uniform_(0.5, 1.5)
        python_layer.beta.uniform_(-0.5, 0.5)
    cpp = cpp_layer(python_layer, name, args, kwargs)
    for shape in [(3, 2, *size), (2, *size)]:
        x = torch.randn(shape)
        torch.testing.assert_close(from_dlpack(cpp.forward(to_dlpack(x))), python_layer(x))


@pytest.mark.parametrize("name,args,size", [("WSLinear", (12, 5), (12,)), ("WSConv2d", (3, 4, [3]), (3, 6, 6))])
def test_cpp_module_with_spike_input(name, args, size):
    python_layer = getattr(mth.snn, name)(*[a[0] if isinstance(a, list) else a for a in args])
    with torch.no_grad():
        python_layer.gamma.uniform_(0.5, 1.5)
    dense, spiking = cpp_layer(python_layer, name, args, {}), cpp_layer(python_layer, name, args, dict(spike_input=True))
    assert repr(spiking).endswith(", spike_input=true)") and "spike_input" not in repr(dense)
    x = torch.randint(0, 2, (3, 2, *size)).float()
    expected = from_dlpack(dense.forward(to_dlpack(x)))
    torch.testing.assert_close(expected, python_layer(x))
    assert torch.equal(from_dlpack(spiking.forward(to_dlpack(x))), expected)  # the same dense op
    x.view(-1)[1] = 0.5
    with pytest.raises(ValueError, match=rf"^{name}: spike_input=True expects an input of spikes"):
        spiking.forward(to_dlpack(x))
    dense.forward(to_dlpack(x))  # the dense layer takes any value


def test_cpp_module_parameters_repr_and_errors():
    cpp = mth._C.WSConv2d(3, 8, [3], affine=False)
    params = cpp.named_parameters()
    assert torch.equal(from_dlpack(params["gamma"]), torch.ones(8))
    assert torch.equal(from_dlpack(params["beta"]), torch.zeros(8))
    weight = from_dlpack(params["weight"])
    bound = 1 / 27 ** 0.5  # torch.nn's initialisation
    assert weight.shape == (8, 3, 3, 3) and 0.9 * bound < weight.abs().max() <= bound
    assert repr(cpp) == ("matterhorn::snn::WSConv2d(3, 8, kernel_size=[3, 3], stride=[1, 1], padding=[0, 0], "
                         "dilation=[1, 1], groups=1, bias=true, padding_mode=zeros, affine=false, eps=1e-06)")
    assert repr(mth._C.WSLinear(4, 2)) == (
        "matterhorn::snn::WSLinear(in_features=4, out_features=2, bias=true, affine=true, eps=1e-06)")
    with pytest.raises(ValueError, match=r"^WSLinear: weight standardisation needs 2 or more weights per output"):
        mth._C.WSLinear(1, 3)
    with pytest.raises(ValueError, match=r"^WSConv2d: eps must be >= 0, got -1"):
        mth._C.WSConv2d(3, 8, [3], eps=-1)
    with pytest.raises(ValueError, match=r"WSConv1d: in_channels and out_channels must be divisible by groups"):
        mth._C.WSConv1d(3, 8, [3], groups=2)
