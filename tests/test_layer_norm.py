"""LayerNorm against torch.nn, and the LayerNorm ops (layer_norm, layer_norm_normalize, layer_norm_backward)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import matterhorn_pytorch as mth
from samples import (DEVICES, LAYER_NORM_SAMPLES, assert_within, check_against_reference, check_no_derivative, opcheck,
                     rounding, sum_error)

ops = torch.ops.matterhorn


@pytest.mark.parametrize("shape,normalized_shape", [
    ((6, 10), (10,)),             # [B, F]: the published 2.0.0 fails here
    ((3, 6, 10), (10,)),          # [T, B, F]
    ((3, 2, 4, 5, 6), (5, 6)),    # [T, B, C, H, W] over (H, W)
    ((3, 2, 4, 5, 6), (4, 5, 6)),
    ((2, 3, 4097), (4097,)),      # a row longer than one chunk of the moments (4096)
    ((64, 16, 40), (40,)),        # enough rows for one task per thread in the backward
])
@pytest.mark.parametrize("affine", [dict(), dict(elementwise_affine=False), dict(bias=False)], ids=["affine", "no-affine", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_norm_equals_torch(shape, normalized_shape, affine, dtype):
    ours = mth.snn.LayerNorm(normalized_shape, **affine, dtype=dtype)
    reference = nn.LayerNorm(normalized_shape, **affine, dtype=dtype)
    if ours.weight is not None:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            if ours.bias is not None:
                ours.bias.uniform_(-1, 1)
    reference.load_state_dict(ours.state_dict())
    x = (3 * torch.randn(shape, dtype=dtype) + 5).requires_grad_()  # an offset mean: a one-pass variance would lose digits
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    # the parameters' gradients are sums over every row, in another order than torch's, of terms
    # g * xhat whose xhat comes from float32 statistics of a row: each is within (rows + row
    # length) eps of the sum of its terms' magnitudes (g * xhat for the weight, g for the bias)
    row = torch.Size(normalized_shape).numel()
    n = x.numel() // row + row
    dims = tuple(range(x.dim() - len(normalized_shape)))
    xhat = F.layer_norm(x.detach().double(), normalized_shape)
    magnitudes = [(grad.double() * xhat).abs().sum(dims), grad.double().abs().sum(dims)]
    for a, b, terms in zip(ours.parameters(), reference.parameters(), magnitudes):
        if dtype == torch.float32:
            assert_within(a.grad, b.grad, 2 * sum_error(n) * terms)  # ours and torch's each
        else:
            torch.testing.assert_close(a.grad, b.grad)
    ours.single_step_mode_()  # single-step [B, ...]: the same trailing-dimension normalization
    torch.testing.assert_close(ours(x.detach()), y_ref.detach())


def test_one_value_per_row_gives_the_bias_and_no_input_gradient():
    layer = mth.snn.LayerNorm(1)
    with torch.no_grad():
        layer.bias.fill_(0.25)
    x = torch.randn(3, 2, 1, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, torch.full_like(y, 0.25))  # x - mean is exactly 0 (torch's own: within 1e-5)
    y.backward(torch.randn_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(layer.weight.grad, torch.zeros(1))


def test_non_contiguous_input_and_gradient():
    ours, reference = mth.snn.LayerNorm(6), nn.LayerNorm(6)
    x = torch.randn(6, 4, 3).transpose(0, 2).requires_grad_()  # [3, 4, 6], not contiguous
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()  # an expanded (stride 0) gradient
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    # torch.nn in float64 on the same rounded values; ours accumulates in float32 and rounds each
    # result once to dtype: an error of half a unit of dtype plus float32 sums over N = 384 values
    # (mean, variance, the row sums of the backward) or 32 rows (the parameters' gradients, whose
    # terms carry the row statistics' error too)
    N, rows = 384, 32
    ours = mth.snn.LayerNorm(N, dtype=dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    reference = nn.LayerNorm(N, dtype=torch.float64)
    reference.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = (torch.randn(4, 8, N) + 3).to(dtype).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    y, y_ref = ours(x), reference(x_ref)
    assert y.dtype == dtype
    w, b = reference.weight.detach(), reference.bias.detach()
    rstd = (x_ref.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt().detach()
    xhat = ((x_ref - x_ref.mean(-1, keepdim=True)) * rstd).detach()
    # a float32 mean is off by N eps times the values' magnitude, not the deviations'
    shift = rstd * x_ref.detach().abs().mean(-1, keepdim=True)
    assert_within(y, y_ref, rounding(dtype) * y_ref.abs() + sum_error(N) * ((xhat.abs() + shift) * w + b.abs()))

    g = torch.randn(4, 8, N).to(dtype)
    y.backward(g)
    y_ref.backward(g.double())
    gw = g.double() * w
    xhat = xhat.abs() + shift
    dx_terms = rstd * (gw.abs() + gw.abs().mean(-1, keepdim=True) + xhat * (gw * xhat).abs().mean(-1, keepdim=True))
    assert_within(x.grad, x_ref.grad, rounding(dtype) * x_ref.grad.abs() + sum_error(N) * dx_terms)
    dw_terms = (g.double().abs() * xhat).flatten(0, 1).sum(0)
    assert_within(ours.weight.grad, reference.weight.grad,
                  rounding(dtype) * reference.weight.grad.abs() + sum_error(rows + N) * dw_terms)
    db_terms = g.double().abs().flatten(0, 1).sum(0)
    assert_within(ours.bias.grad, reference.bias.grad, rounding(dtype) * reference.bias.grad.abs() + sum_error(rows) * db_terms)
    _, mean, rstd = ops.layer_norm_normalize(x.detach(), [N], None, None, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (4, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [384, 37])  # whole vectors; vectors and a tail
def test_half_precision_rounds_like_torch_casts(dtype, size):
    # float32 accumulation either way, so the half-precision results are the float32 path's,
    # rounded to nearest even as .to(dtype) does; vectors convert 16 values at a time
    x = (torch.randn(5, 3, size) * 4).to(dtype)
    x[0, 0, 1] = float("nan")
    w, b = torch.rand(size).to(dtype) + 0.5, torch.randn(size).to(dtype)
    y, mean, rstd = ops.layer_norm_normalize(x, [size], w, b, 1e-5)
    y32, mean32, rstd32 = ops.layer_norm_normalize(x.float(), [size], w.float(), b.float(), 1e-5)
    torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0, equal_nan=True)
    assert y[0, 0].isnan().all() and not y[1:].isnan().any()
    torch.testing.assert_close(mean, mean32, rtol=0, atol=0, equal_nan=True)
    g = torch.randn(5, 3, size).to(dtype)
    dx, dw, db = ops.layer_norm_backward(g, x, [size], mean, rstd, w)
    dx32, dw32, db32 = ops.layer_norm_backward(g.float(), x.float(), [size], mean32, rstd32, w.float())
    torch.testing.assert_close(dx, dx32.to(dtype), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(db, db32.to(dtype), rtol=0, atol=0, equal_nan=True)


def test_layer_norm_gradcheck():
    layer = mth.snn.LayerNorm((3, 2), dtype=torch.float64)
    x = torch.randn(2, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradgradcheck(layer, (x,))  # create_graph=True takes ATen's backward


@pytest.mark.parametrize("sample", [s for s in LAYER_NORM_SAMPLES if s.gradcheck], ids=lambda s: f"{s.op}-{s.id}")
def test_op_gradcheck_forward_ad_and_gradgradcheck_float64(sample):
    args = sample.build("cpu")
    where = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def run(*tensors):
        values = list(args)
        for i, t in zip(where, tensors):
            values[i] = t
        return sample.overload(*values)[0]

    inputs = tuple(args[i] for i in where)
    assert torch.autograd.gradcheck(run, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(run, inputs)


@pytest.mark.parametrize("wrt", ["input", "weight", "bias"])
def test_gradients_of_some_inputs_only_equal_torch(wrt):
    values = dict(input=torch.randn(3, 4, 7), weight=torch.rand(7) + 0.5, bias=torch.randn(7))
    grad_output = torch.randn(3, 4, 7)

    def gradient(layer_norm):
        tensors = {k: v.clone().requires_grad_(k == wrt) for k, v in values.items()}
        y = layer_norm(tensors["input"], [7], tensors["weight"], tensors["bias"], 1e-5)
        return torch.autograd.grad(y, tensors[wrt], grad_output)[0]

    torch.testing.assert_close(gradient(ops.layer_norm), gradient(F.layer_norm))


def test_no_graph_without_gradients_and_backward_twice_needs_retain_graph():
    x = torch.randn(2, 3, 5)
    layer = mth.snn.LayerNorm(5)
    with torch.no_grad():
        assert layer(x.requires_grad_()).grad_fn is None
    y = layer(x)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


def test_cpu_autocast_and_a_bfloat16_input_with_float32_parameters_like_torch():
    ours, reference = mth.snn.LayerNorm(8), nn.LayerNorm(8)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 8).bfloat16().requires_grad_()  # what a previous autocast layer hands on
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = ours(x), reference(x_ref)
    assert y.dtype == y_ref.dtype == torch.bfloat16  # torch's CPU autocast leaves layer_norm alone
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert ours.weight.grad.dtype == torch.float32
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", LAYER_NORM_SAMPLES, ids=lambda s: f"{s.op}-{s.id}")
def test_op_equals_torch_nn_or_a_float64_formula(sample, device):
    check_against_reference(sample, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", LAYER_NORM_SAMPLES, ids=lambda s: f"{s.op}-{s.id}")
def test_opcheck(sample, device):
    opcheck(sample.overload, sample.build(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", [s for s in LAYER_NORM_SAMPLES if s.op == "layer_norm_backward"],
                         ids=lambda s: s.id)
def test_backward_block_has_no_derivative(sample, device):
    check_no_derivative(sample, device)


class TestErrors:
    def test_wrong_trailing_shape(self):
        with pytest.raises(ValueError, match=r"LayerNorm\(normalized_shape=\[5, 6\]\): expected input \[T, B, \.\.\., 5, 6\] "
                                             r"in multi-step mode or \[B, \.\.\., 5, 6\] in single-step mode; got \[2, 3, 6, 5\]"):
            mth.snn.LayerNorm((5, 6))(torch.randn(2, 3, 6, 5))

    def test_weight_of_another_dtype(self):
        with pytest.raises(TypeError, match=r"LayerNorm: the input's dtype torch.float64 does not match the layer's weight"):
            mth.snn.LayerNorm(4)(torch.randn(2, 3, 4, dtype=torch.float64))
        with pytest.raises(TypeError, match=r"the input's dtype torch.bfloat16 does not match the layer's weight dtype torch.float16"):
            mth.snn.LayerNorm(4, dtype=torch.float16)(torch.randn(2, 3, 4, dtype=torch.bfloat16))

    def test_building_block_with_a_wrong_weight_shape(self):
        with pytest.raises(ValueError, match=r"layer_norm_normalize: expected weight of shape \[6\], got \[5\]"):
            ops.layer_norm_normalize(torch.randn(2, 6), [6], torch.randn(5), None, 1e-5)

    def test_building_block_with_a_zero_normalized_size_is_empty_as_in_torch(self):
        x = torch.randn(2, 0)
        y, mean, rstd = ops.layer_norm_normalize(x, [0], None, None, 1e-5)
        assert y.shape == torch.nn.functional.layer_norm(x, [0]).shape == (2, 0)
        assert mean.shape == rstd.shape == (2,) and mean.isnan().all()  # statistics of no values

    def test_backward_with_statistics_of_the_wrong_shape(self):
        with pytest.raises(ValueError, match=r"layer_norm_backward: expected mean of shape \[3\]"):
            ops.layer_norm_backward(torch.randn(3, 6), torch.randn(3, 6), [6], torch.zeros(4), torch.ones(3), None)
