"""The convolution family against torch.nn on the folded tensor, and the conv ops."""

import inspect
import re

import pytest
import torch
import torch.nn as nn

import matterhorn_pytorch as mth
from samples import CONV_SAMPLES, DEVICES, opcheck

LAYER_SAMPLES = [s for s in CONV_SAMPLES if s.padding is None]  # explicit pairs: the op alone takes them


def twins(name, kwargs, dtype, **extras):
    ours = getattr(mth.snn, name)(**kwargs, dtype=dtype, **extras)
    reference = getattr(nn, name)(**kwargs, dtype=dtype)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def assert_same_gradients(ours, reference, x, x_ref, y, y_ref):
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
    if ours.bias is not None:
        torch.testing.assert_close(ours.bias.grad, reference.bias.grad)


@pytest.mark.parametrize("sample", LAYER_SAMPLES, ids=lambda s: s.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["multi-step", "single-step", "batch_first"])
@pytest.mark.parametrize("time_batch", [(3, 2), (1, 5)], ids=["T3B2", "T1B5"])
def test_equals_torch_on_the_folded_tensor(sample, dtype, layout, time_batch):
    T, B = time_batch
    channels = sample.kwargs["in_channels"]
    ours, reference = twins(sample.name, sample.kwargs, dtype, batch_first=layout == "batch_first")
    extra = {"output_size": list(sample.output_size)} if sample.output_size else {}
    if layout == "single-step":
        ours.single_step_mode_()
        x = torch.randn(B, channels, *sample.size, dtype=dtype, requires_grad=True)
    elif layout == "batch_first":
        x = torch.randn(B, T, channels, *sample.size, dtype=dtype, requires_grad=True)
    else:
        x = torch.randn(T, B, channels, *sample.size, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    y = ours(x, **extra)
    y_ref = reference(x_ref, **extra) if layout == "single-step" else reference(x_ref.flatten(0, 1), **extra).unflatten(
        0, x.shape[:2])
    torch.testing.assert_close(y, y_ref)
    assert y.is_contiguous()
    assert_same_gradients(ours, reference, x, x_ref, y, y_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", CONV_SAMPLES, ids=lambda s: s.id)
def test_op_equals_torch_on_the_folded_tensor(sample, device):
    op, args = sample.op_args(device)
    inputs = [a for a in args[:3] if a is not None]
    y, y_ref = op(*args), sample.torch_reference(*args[:3])
    torch.testing.assert_close(y, y_ref)
    if sample.requires_grad:
        grad = torch.randn_like(y)
        for ours, theirs in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(y_ref, inputs, grad)):
            torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("sample", [s for s in CONV_SAMPLES if s.gradcheck], ids=lambda s: s.id)
def test_gradcheck_gradgradcheck_and_forward_ad_float64(sample):
    op, args = sample.op_args(dtype=torch.float64, requires_grad=True)
    inputs = tuple(a for a in args[:3] if a is not None)

    def run(*tensors):
        return op(*tensors, *args[len(tensors):]) if len(tensors) == 3 else op(*tensors, None, *args[3:])

    # forward mode too (torch.func.jvp): the graph is ATen's own convolution node
    assert torch.autograd.gradcheck(run, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(run, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", CONV_SAMPLES, ids=lambda s: s.id)
def test_opcheck(sample, device):
    opcheck(*sample.op_args(device), aot=sample.aot)


@pytest.mark.parametrize("name", ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"])
@pytest.mark.parametrize("time_batch", [(0, 3), (2, 0)], ids=["T0", "B0"])
def test_an_empty_time_or_batch_axis_gives_torch_nn_empty_output(name, time_batch):
    sample = next(s for s in LAYER_SAMPLES if s.name == name)
    ours, reference = twins(name, sample.kwargs, torch.float32)
    x = torch.randn(*time_batch, sample.kwargs["in_channels"], *sample.size, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), reference(x_ref.flatten(0, 1)).unflatten(0, time_batch)
    assert y.shape == y_ref.shape and y.numel() == 0
    assert_same_gradients(ours, reference, x, x_ref, y, y_ref)
    assert x.grad.shape == x.shape and not ours.weight.grad.any()


@pytest.mark.parametrize("name", ["Conv2d", "ConvTranspose2d"])
def test_a_single_step_input_into_a_multi_step_layer_is_one_step(name):
    ours, reference = twins(name, dict(in_channels=2, out_channels=3, kernel_size=3), torch.float32)
    x = torch.randn(4, 2, 6, 6)  # [B, C, H, W] into a multi-step layer: the rank tells
    assert ours.multi_step_mode
    torch.testing.assert_close(ours(x), reference(x))


@pytest.mark.parametrize("output_size", [[13, 11], [4, 3, 13, 11], [5, 4, 3, 13, 11]], ids=["spatial", "BCHW", "TBCHW"])
def test_conv_transpose_output_size(output_size):
    ours, reference = twins("ConvTranspose2d", dict(in_channels=3, out_channels=2, kernel_size=3, stride=2, padding=1),
                            torch.float64)
    x = torch.randn(5, 4, 3, 7, 6, dtype=torch.float64)
    y = ours(x, output_size=output_size)
    assert y.shape == (5, 4, 2, 13, 11)
    torch.testing.assert_close(y, reference(x.flatten(0, 1), output_size=[13, 11]).unflatten(0, (5, 4)))
    with pytest.raises(ValueError, match=r"ConvTranspose2d: requested an output size of \[15, 11\], but valid sizes "
                                         r"range from \[13, 11\] to \[14, 12\] for input \[T, B, C, H, W\]"):
        ours(x, output_size=[15, 11])


# ---- parameters -------------------------------------------------------------------------------

ALL_SIX = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]


@pytest.mark.parametrize("name", ALL_SIX)
def test_state_dict_loads_both_ways_and_initialisation_is_torch_nn(name):
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=3, groups=2)
    torch.manual_seed(7)
    ours = getattr(mth.snn, name)(**kwargs)
    torch.manual_seed(7)
    reference = getattr(nn, name)(**kwargs)
    # The same random draws in the same order: the initialisation is torch.nn's, not just alike.
    torch.testing.assert_close(ours.weight, reference.weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.bias, reference.bias, rtol=0, atol=0)
    assert isinstance(ours, getattr(nn, name)) and getattr(mth.snn.synapse, name) is getattr(mth.snn, name)
    fresh = getattr(nn, name)(**kwargs)
    fresh.load_state_dict(ours.state_dict())
    ours.load_state_dict(getattr(nn, name)(**kwargs).state_dict())


@pytest.mark.parametrize("name", ALL_SIX)
def test_constructor_signature_is_the_torch_nn_one_plus_keyword_extras(name):
    ours = inspect.signature(getattr(mth.snn, name))
    theirs = inspect.signature(getattr(nn, name))
    assert list(ours.parameters)[: len(theirs.parameters)] == list(theirs.parameters)
    assert [p.default for p in ours.parameters.values()][: len(theirs.parameters)] == [
        p.default for p in theirs.parameters.values()]
    assert ours.parameters["batch_first"].kind is inspect.Parameter.KEYWORD_ONLY
    # positional use, as on the page
    layer = getattr(mth.snn, name)(2, 4, 3, 1, 1)
    assert layer.padding == ((1,) * len(layer.kernel_size)) and layer.multi_step_mode


# ---- layout and autocast ----------------------------------------------------------------------

@pytest.mark.parametrize("name,spatial,fmt", [("Conv2d", (8, 9), torch.channels_last),
                                              ("Conv3d", (4, 5, 6), torch.channels_last_3d)])
def test_channels_last_in_gives_channels_last_out(name, spatial, fmt):
    ours, reference = twins(name, dict(in_channels=3, out_channels=8, kernel_size=3, padding=1), torch.float32)
    T, B, C = 2, 3, 3
    # multi-step: [T, B, C, ...] whose memory is [T, B, ..., C]; folding it is a view
    x = torch.randn(T, B, *spatial, C).movedim(-1, 2)
    y = ours(x)
    assert y.flatten(0, 1).is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, reference(x.flatten(0, 1)).unflatten(0, (T, B)))
    single = x[0].contiguous(memory_format=fmt)
    assert ours(single).is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("name", ["Conv2d", "ConvTranspose2d"])
def test_autocast_bfloat16_on_cpu(name):
    ours, _ = twins(name, dict(in_channels=4, out_channels=8, kernel_size=3, padding=1), torch.float32)
    x = torch.randn(2, 3, 4, 8, 8)
    expected = ours(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=5e-2)


# ---- errors in the user's terms ---------------------------------------------------------------

class TestErrors:
    def test_wrong_channel_count_reports_the_unfolded_shape(self):
        layer = mth.snn.Conv2d(3, 8, 3)
        message = r"Conv2d\(in_channels=3\): expected input \[T, B, 3, H, W\] in multi-step mode or \[B, 3, H, W\] " \
                  r"in single-step mode; got \[4, 2, 5, 8, 8\]"
        with pytest.raises(ValueError, match=message):
            layer(torch.randn(4, 2, 5, 8, 8))

    @pytest.mark.parametrize("name,shape,accepted", [
        ("Conv2d", (8, 8), r"\[T, B, C, H, W\] in multi-step mode or \[B, C, H, W\] \(unbatched: \[C, H, W\]\) in "
                           r"single-step mode"),
        ("Conv1d", (2, 3, 4, 5, 6), r"\[T, B, C, L\] in multi-step mode or \[B, C, L\] \(unbatched: \[C, L\]\) in "
                                    r"single-step mode"),
        ("ConvTranspose3d", (3, 4, 5), r"\[T, B, C, H, W, L\] in multi-step mode or \[B, C, H, W, L\] \(unbatched"),
    ])
    def test_wrong_rank_lists_the_accepted_shapes(self, name, shape, accepted):
        layer = getattr(mth.snn, name)(3, 4, 1)
        with pytest.raises(ValueError, match=rf"{name}: expected input {accepted}.*got a {len(shape)}-D tensor"):
            layer(torch.randn(*shape))

    def test_input_too_small_for_the_kernel(self):
        with pytest.raises(ValueError, match=r"Conv2d: the input is too small for the kernel: spatial size 2 padded by "
                                             r"\(0, 0\) is smaller than the dilated kernel size 5.*\[T, B, C, H, W\] = "
                                             r"\[2, 3, 1, 2, 9\]"):
            mth.snn.Conv2d(1, 1, 3, dilation=2)(torch.randn(2, 3, 1, 2, 9))

    def test_reflect_padding_larger_than_the_input(self):
        with pytest.raises(ValueError, match=r"padding_mode='reflect' needs padding smaller than the input size"):
            mth.snn.Conv1d(1, 1, 1, padding=3, padding_mode="reflect")(torch.randn(2, 3, 1, 3))

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match=r"Conv2d: the input's dtype torch.float64 does not match"):
            mth.snn.Conv2d(1, 1, 1)(torch.randn(2, 1, 1, 4, 4, dtype=torch.float64))

    @pytest.mark.parametrize("kwargs,message", [
        (dict(in_channels=3, out_channels=4, kernel_size=3, groups=2), "Conv2d: in_channels must be divisible by groups"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, padding="full"), "Conv2d: Invalid padding string 'full'"),
        (dict(in_channels=4, out_channels=-1, kernel_size=3), r"Conv2d: out_channels must be .* >= 1, got -1"),
        (dict(in_channels=4, out_channels=4, kernel_size=(3, 0)), r"Conv2d: kernel_size must be .* >= 1, got \(3, 0\)"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, padding=-1), r"Conv2d: padding must be .* >= 0, got -1"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, stride=0), r"Conv2d: stride must be .* >= 1, got 0"),
    ])
    def test_bad_constructor_arguments(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            mth.snn.Conv2d(**kwargs)

    def test_bad_output_padding_at_construction(self):
        with pytest.raises(ValueError, match=re.escape("ConvTranspose1d: output_padding must be an integer (or a tuple of them) >= 0")):
            mth.snn.ConvTranspose1d(2, 2, 3, output_padding=-1)


@pytest.mark.parametrize("output_size", [[0], [1]])
def test_output_size_below_the_layers_own_output_is_torch_nns_result(output_size):
    # the layer's output would be size -1; output_size picks the output_padding that makes 0 or 1, as in torch.nn
    ours = mth.snn.ConvTranspose1d(1, 1, 1, stride=3, padding=1, multi_time_step=False)
    reference = nn.ConvTranspose1d(1, 1, 1, stride=3, padding=1)
    reference.load_state_dict(ours.state_dict())
    x = torch.rand(2, 1, 1)
    torch.testing.assert_close(ours(x, output_size=output_size), reference(x, output_size=output_size))
