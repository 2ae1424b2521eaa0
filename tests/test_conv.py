"""The convolution family against torch.nn on the folded tensor, and the conv ops."""

import inspect
import re

import pytest
import torch
import torch.nn as nn

import matterhorn_pytorch as mth

# (class name, constructor arguments, spatial input size): every option of torch.nn, odd sizes,
# groups > 1, dilation > 1, stride > 1, 'same' with even kernels, every padding_mode.
CONFIGS = [
    ("Conv1d", dict(in_channels=3, out_channels=4, kernel_size=3), (11,)),
    ("Conv1d", dict(in_channels=2, out_channels=4, kernel_size=3, stride=2, padding=1, dilation=2), (13,)),
    ("Conv1d", dict(in_channels=4, out_channels=6, kernel_size=4, padding="same", padding_mode="reflect", groups=2), (9,)),
    ("Conv1d", dict(in_channels=3, out_channels=3, kernel_size=2, padding="valid", bias=False), (7,)),
    ("Conv2d", dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), (7, 9)),
    ("Conv2d", dict(in_channels=4, out_channels=6, kernel_size=(2, 3), stride=(2, 1), padding=(1, 0),
                    dilation=(1, 2), groups=2, padding_mode="replicate"), (7, 8)),
    ("Conv2d", dict(in_channels=2, out_channels=3, kernel_size=4, padding="same", dilation=2, padding_mode="circular"), (9, 10)),
    ("Conv2d", dict(in_channels=3, out_channels=2, kernel_size=3, padding=2, padding_mode="reflect", bias=False), (5, 6)),
    ("Conv2d", dict(in_channels=2, out_channels=4, kernel_size=2, padding="same"), (5, 5)),
    ("Conv3d", dict(in_channels=2, out_channels=3, kernel_size=3, padding=1), (4, 5, 6)),
    ("Conv3d", dict(in_channels=4, out_channels=2, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1),
                    groups=2, padding_mode="circular"), (3, 7, 5)),
    ("Conv3d", dict(in_channels=2, out_channels=2, kernel_size=2, padding="same", padding_mode="replicate"), (3, 4, 5)),
    ("ConvTranspose1d", dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1, output_padding=1), (7,)),
    ("ConvTranspose1d", dict(in_channels=4, out_channels=2, kernel_size=4, groups=2, dilation=2, bias=False), (5,)),
    ("ConvTranspose2d", dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, output_padding=1, groups=2), (5, 6)),
    ("ConvTranspose2d", dict(in_channels=2, out_channels=3, kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1)), (4, 5)),
    ("ConvTranspose3d", dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1, output_padding=(1, 0, 1)), (3, 4, 3)),
    ("ConvTranspose3d", dict(in_channels=4, out_channels=2, kernel_size=2, groups=2, bias=False), (3, 3, 4)),
]


def config_id(config):
    name, kwargs, size = config
    return name + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("in_channels", "out_channels"))


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


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["multi-step", "single-step", "batch_first"])
@pytest.mark.parametrize("time_batch", [(3, 2), (1, 5)], ids=["T3B2", "T1B5"])
def test_equals_torch_on_the_folded_tensor(config, dtype, layout, time_batch):
    name, kwargs, size = config
    T, B = time_batch
    channels = kwargs["in_channels"]
    ours, reference = twins(name, kwargs, dtype, batch_first=layout == "batch_first")
    if layout == "single-step":
        ours.single_step_mode_()
        x = torch.randn(B, channels, *size, dtype=dtype, requires_grad=True)
    elif layout == "batch_first":
        x = torch.randn(B, T, channels, *size, dtype=dtype, requires_grad=True)
    else:
        x = torch.randn(T, B, channels, *size, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    y = ours(x)
    y_ref = reference(x_ref) if layout == "single-step" else reference(x_ref.flatten(0, 1)).unflatten(0, x.shape[:2])
    torch.testing.assert_close(y, y_ref)
    assert y.is_contiguous()
    assert_same_gradients(ours, reference, x, x_ref, y, y_ref)


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


# ---- gradcheck and opcheck -------------------------------------------------------------------

GRADCHECK_CASES = [
    ("Conv1d", dict(in_channels=2, out_channels=2, kernel_size=3, padding=1, padding_mode="reflect"), (5,)),
    ("Conv2d", dict(in_channels=2, out_channels=4, kernel_size=2, padding="same", groups=2), (4, 3)),
    ("Conv3d", dict(in_channels=1, out_channels=2, kernel_size=2, padding=1, padding_mode="circular"), (2, 3, 2)),
    ("ConvTranspose1d", dict(in_channels=2, out_channels=2, kernel_size=3, stride=2, output_padding=1), (3,)),
    ("ConvTranspose2d", dict(in_channels=2, out_channels=2, kernel_size=2, stride=2, dilation=2), (2, 3)),
    ("ConvTranspose3d", dict(in_channels=2, out_channels=2, kernel_size=2, groups=2), (2, 2, 2)),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c[0])
def test_gradcheck_gradgradcheck_and_forward_ad_float64(case):
    name, kwargs, size = case
    layer = getattr(mth.snn, name)(**kwargs, dtype=torch.float64)
    x = torch.randn(2, 2, kwargs["in_channels"], *size, dtype=torch.float64, requires_grad=True)

    def run(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    inputs = (x, layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_())
    # forward mode too (torch.func.jvp): the graph is ATen's own convolution node
    assert torch.autograd.gradcheck(run, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(run, inputs)


def conv_sample_inputs():
    def t(*shape, grad=True, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, requires_grad=grad)

    conv = torch.ops.matterhorn.conv.default
    conv_t = torch.ops.matterhorn.conv_transpose.default
    return [
        (conv, (t(3, 2, 4, 9), t(6, 4, 3), t(6), [1], [1], [1], 1, "zeros")),
        (conv, (t(3, 2, 4, 7, 8), t(4, 2, 2, 3), None, [2, 1], [1, 2, 0, 1], [1, 2], 2, "reflect")),
        (conv, (t(2, 4, 6, 5, grad=False), t(3, 4, 3, 3, grad=False), t(3, grad=False), [1, 1], [1, 1], [1, 1], 1, "circular")),
        (conv, (t(2, 2, 1, 3, 4, 5, dtype=torch.float64), t(2, 1, 2, 2, 2, dtype=torch.float64), None,
                [1, 1, 1], [0, 1, 0, 1, 0, 1], [1, 1, 1], 1, "replicate")),
        (conv_t, (t(3, 2, 4, 5), t(4, 3, 3), t(3), [2], [1], [1], 1, [1], None)),
        (conv_t, (t(2, 2, 4, 5, 6), t(4, 2, 3, 3), t(4), [2, 2], [1, 1], [0, 0], 2, [1, 1], [10, 12])),
        (conv_t, (t(2, 3, 2, 3, 3, 3, dtype=torch.float64), t(2, 2, 2, 2, 2, dtype=torch.float64), None,
                  [1, 1, 1], [0, 0, 0], [0, 0, 0], 1, [1, 1, 1], None)),
    ]


@pytest.mark.parametrize("sample", conv_sample_inputs(), ids=lambda s: None)
def test_opcheck(sample):
    op, args = sample
    torch.library.opcheck(op, args)


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
        ("Conv2d", (3, 8, 8), r"\[T, B, C, H, W\] in multi-step mode or \[B, C, H, W\] in single-step mode"),
        ("Conv1d", (2, 3, 4, 5, 6), r"\[T, B, C, L\] in multi-step mode or \[B, C, L\] in single-step mode"),
        ("ConvTranspose3d", (3, 4, 5), r"\[T, B, C, H, W, L\] in multi-step mode or \[B, C, H, W, L\] in single-step"),
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
