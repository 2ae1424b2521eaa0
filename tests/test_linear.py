"""mth.snn.Linear against torch.nn.Linear on the folded tensor, and the matterhorn::linear op."""

import pytest
import torch
import torch.nn as nn

import matterhorn_pytorch as mth
from samples import assert_within, rounding, sum_error

SHAPES = [(7,), (5, 7), (3, 5, 7), (3, 2, 4, 7), (2, 3, 2, 2, 7)]  # 1-D to 5-D, last = in_features


def twin_layers(bias: bool, dtype: torch.dtype):
    ours = mth.snn.Linear(7, 6, bias=bias, dtype=dtype)
    reference = nn.Linear(7, 6, bias=bias, dtype=dtype)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_torch_on_the_folded_tensor(shape, dtype, bias):
    ours, reference = twin_layers(bias, dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    y = ours(x)
    folded = x_ref.reshape(-1, 7)
    y_ref = reference(folded).reshape(*shape[:-1], 6)
    torch.testing.assert_close(y, y_ref)
    assert y.shape == (*shape[:-1], 6) and y.is_contiguous()

    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
    if bias:
        torch.testing.assert_close(ours.bias.grad, reference.bias.grad)


def test_non_contiguous_input():
    ours, reference = twin_layers(True, torch.float64)
    x = torch.randn(4, 7, 3, dtype=torch.float64).transpose(1, 2)  # [4, 3, 7], strided
    torch.testing.assert_close(ours(x), reference(x))


def test_empty_time_axis_gives_empty_output():
    ours, reference = twin_layers(True, torch.float32)
    x = torch.randn(0, 3, 7)
    assert ours(x).shape == reference(x).shape == (0, 3, 6)


def test_cpu_autocast_bfloat16_equals_torch_linear_under_autocast():
    # both cast to bfloat16 and run one GEMM accumulating in float32: they differ by the final
    # rounding to bfloat16 and float32 sums over K = 64 (forward), 6 (dx) or T*B = 15 terms (dw)
    ours, reference = mth.snn.Linear(64, 6), nn.Linear(64, 6)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = ours(x), reference(x_ref.flatten(0, 1)).unflatten(0, (3, 5))
    assert y.dtype == y_ref.dtype == torch.bfloat16
    xb, wb = x.detach().bfloat16().double(), ours.weight.detach().bfloat16().double()
    half = rounding(torch.bfloat16)
    assert_within(y, y_ref, half * y_ref.abs() + sum_error(64) * (xb.abs() @ wb.abs().T + ours.bias.detach().abs()))
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    g = grad.double().abs()
    assert x.grad.dtype == torch.float32 and ours.weight.grad.dtype == torch.float32
    assert_within(x.grad, x_ref.grad, half * x_ref.grad.abs() + sum_error(6) * (g @ wb.abs()))
    assert_within(ours.weight.grad, reference.weight.grad,
                  half * reference.weight.grad.abs() + sum_error(15) * (g.flatten(0, 1).T @ xb.abs().flatten(0, 1)))
    assert_within(ours.bias.grad, reference.bias.grad, half * reference.bias.grad.abs() + sum_error(15) * g.sum((0, 1)))


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_gradgradcheck_and_forward_ad_float64(bias):
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w, b)
    # forward mode too (torch.func.jvp): the graph is ATen's own addmm / mm
    assert torch.autograd.gradcheck(torch.ops.matterhorn.linear, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(torch.ops.matterhorn.linear, inputs)


def linear_sample_inputs():
    def make(*shape, requires_grad=False, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)

    return [
        (make(4, 8, 16), make(10, 16), make(10)),
        (make(4, 8, 16, requires_grad=True), make(10, 16, requires_grad=True), make(10, requires_grad=True)),
        (make(8, 16, requires_grad=True), make(10, 16, requires_grad=True), None),
        (make(16, requires_grad=True), make(3, 16, requires_grad=True), make(3)),
        (make(2, 3, 4, 5, dtype=torch.float64, requires_grad=True),
         make(6, 5, dtype=torch.float64, requires_grad=True), make(6, dtype=torch.float64, requires_grad=True)),
    ]


@pytest.mark.parametrize("args", linear_sample_inputs(), ids=lambda a: None)
def test_opcheck(args):
    torch.library.opcheck(torch.ops.matterhorn.linear.default, args)


def test_state_dict_loads_both_ways():
    ours = mth.snn.Linear(7, 6)
    reference = nn.Linear(7, 6)
    ours.load_state_dict(reference.state_dict())
    torch.testing.assert_close(ours.weight, reference.weight)
    reference2 = nn.Linear(7, 6)
    reference2.load_state_dict(mth.snn.Linear(7, 6).state_dict())  # keys and shapes agree
    assert set(ours.state_dict()) == set(reference.state_dict()) == {"weight", "bias"}


def test_is_an_nn_linear_with_torch_initialisation_bounds():
    layer = mth.snn.Linear(100, 50, dtype=torch.float64)
    assert isinstance(layer, nn.Linear) and isinstance(layer, mth.snn.Synapse)
    assert mth.snn.synapse.Linear is mth.snn.Linear
    bound = 1 / 100**0.5
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    assert layer.bias.abs().max() <= bound
    assert layer.weight.dtype == torch.float64


class TestErrors:
    def test_wrong_last_dimension_names_the_layer_and_the_user_shape(self):
        layer = mth.snn.Linear(256, 10)
        with pytest.raises(ValueError, match=r"Linear\(in_features=256\).*\[T, B, \.\.\., 256\].*got \[4, 8, 255\]"):
            layer(torch.randn(4, 8, 255))

    def test_dtype_mismatch_is_a_type_error(self):
        layer = mth.snn.Linear(4, 2)
        with pytest.raises(TypeError, match=r"Linear: the input's dtype torch.float64 does not match .*torch.float32"):
            layer(torch.randn(3, 2, 4, dtype=torch.float64))

    def test_zero_dimensional_input(self):
        with pytest.raises(ValueError, match=r"Linear\(in_features=4\).*got a 0-D tensor"):
            mth.snn.Linear(4, 2)(torch.tensor(1.0))

    def test_bad_bias_through_the_op(self):
        with pytest.raises(ValueError, match=r"bias must be \[out_features\] = \[2\], got \[3\]"):
            torch.ops.matterhorn.linear(torch.randn(3, 4), torch.randn(2, 4), torch.randn(3))

    def test_errors_also_come_from_the_meta_kernel(self):
        with pytest.raises(ValueError, match=r"got \[4, 8, 5\]"):
            torch.ops.matterhorn.linear(torch.empty(4, 8, 5, device="meta"), torch.empty(2, 4, device="meta"))
