"""mth.snn.Linear against torch.nn.Linear on the folded tensor, and the matterhorn::linear op."""

import pytest
import torch
import torch.nn as nn

import matterhorn_pytorch as mth
from samples import DEVICES, LINEAR_SAMPLES, assert_within, opcheck, rounding, sum_error



def twin_layers(bias: bool, dtype: torch.dtype, in_features=7, out_features=6):
    ours = mth.snn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    reference = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


@pytest.mark.parametrize("sample", LINEAR_SAMPLES, ids=lambda s: s.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_gradients_equal_torch_on_the_folded_tensor(sample, dtype):
    shape, features = sample.shape, sample.shape[-1]
    ours, reference = twin_layers(sample.bias, dtype, features, sample.out_features)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    y = ours(x)
    folded = x_ref.reshape(-1, features)
    y_ref = reference(folded).reshape(*shape[:-1], sample.out_features)
    torch.testing.assert_close(y, y_ref)
    assert y.shape == (*shape[:-1], sample.out_features) and y.is_contiguous()

    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
    if sample.bias:
        torch.testing.assert_close(ours.bias.grad, reference.bias.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", LINEAR_SAMPLES, ids=lambda s: s.id)
def test_op_equals_torch_on_the_folded_tensor(sample, device):
    op, args = sample.op_args(device)
    y, y_ref = op(*args), sample.torch_reference(*args)
    torch.testing.assert_close(y, y_ref)
    inputs = [a for a in args if a is not None and a.requires_grad]
    if inputs:
        grad = torch.randn_like(y)
        for ours, theirs in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(y_ref, inputs, grad)):
            torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", LINEAR_SAMPLES, ids=lambda s: s.id)
def test_opcheck(sample, device):
    opcheck(*sample.op_args(device), aot=sample.aot)


@pytest.mark.parametrize("sample", [s for s in LINEAR_SAMPLES if s.gradcheck], ids=lambda s: s.id)
def test_gradcheck_gradgradcheck_and_forward_ad_float64(sample):
    op, inputs = sample.op_args(dtype=torch.float64, grad="xwb")
    # forward mode too (torch.func.jvp): the graph is ATen's own addmm / mm
    assert torch.autograd.gradcheck(op, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(op, inputs)


def test_non_contiguous_input():
    ours, reference = twin_layers(True, torch.float64)
    x = torch.randn(4, 7, 3, dtype=torch.float64).transpose(1, 2)  # [4, 3, 7], strided
    torch.testing.assert_close(ours(x), reference(x))


@pytest.mark.parametrize("time_batch", [(0, 3), (3, 0)], ids=["T0", "B0"])
def test_an_empty_time_or_batch_axis_gives_torch_nn_empty_output(time_batch):
    ours, reference = twin_layers(True, torch.float32)
    x = torch.randn(*time_batch, 7, requires_grad=True)
    y, y_ref = ours(x), reference(x.flatten(0, 1)).unflatten(0, time_batch)
    assert y.shape == y_ref.shape == (*time_batch, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape and not ours.weight.grad.any() and not ours.bias.grad.any()


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
