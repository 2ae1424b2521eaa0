"""The C++ modules (matterhorn::snn::*, bound in _C) against the Python classes."""

import pytest
import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

import matterhorn_pytorch as mth
from samples import CONV_SAMPLES

# the layer samples (the op-only explicit padding and output_size are not constructor arguments)
LAYER_CONV_SAMPLES = [s for s in CONV_SAMPLES if s.padding is None and s.output_size is None and s.dtype == torch.float32]


def cpp_twin(python_layer, cpp_layer):
    cpp_layer.load_parameters({name: to_dlpack(p.detach()) for name, p in python_layer.named_parameters()})
    return cpp_layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 7), (3, 7), (2, 2, 2, 7)])
def test_cpp_linear_matches_python_linear(bias, shape):
    python_layer = mth.snn.Linear(7, 5, bias=bias)
    cpp_layer = cpp_twin(python_layer, mth._C.Linear(7, 5, bias=bias))
    x = torch.randn(shape)
    torch.testing.assert_close(from_dlpack(cpp_layer.forward(to_dlpack(x))), python_layer(x))
    names = set(cpp_layer.named_parameters())
    assert names == {name for name, _ in python_layer.named_parameters()}


def test_cpp_linear_initialisation_and_repr():
    cpp_layer = mth._C.Linear(100, 30)
    weight = from_dlpack(cpp_layer.named_parameters()["weight"])
    assert weight.shape == (30, 100)
    assert 0.9 * 0.1 < weight.abs().max() <= 0.1  # U(-1/sqrt(in), 1/sqrt(in)), as torch.nn
    assert repr(cpp_layer) == "matterhorn::snn::Linear(in_features=100, out_features=30, bias=true)"


def test_cpp_linear_errors_keep_their_python_types():
    cpp_layer = mth._C.Linear(4, 2)
    with pytest.raises(ValueError, match=r"got \[3, 5\]"):
        cpp_layer.forward(to_dlpack(torch.randn(3, 5)))
    with pytest.raises(TypeError, match="dtype"):
        cpp_layer.forward(to_dlpack(torch.randn(3, 4, dtype=torch.float64)))
    with pytest.raises(KeyError, match="no parameter or buffer named 'gain'"):
        cpp_layer.load_parameters({"gain": to_dlpack(torch.ones(2))})
    for wrong in (torch.randn(4), torch.randn(()), torch.ones(2, 4, dtype=torch.int64)):  # copy_ would take them
        with pytest.raises(ValueError, match=r"load_parameters: 'weight' of .*Linear.* is torch.float32 \[2, 4\], got "):
            cpp_layer.load_parameters({"weight": to_dlpack(wrong)})
    with pytest.raises(TypeError, match=r"Linear: the input's dtype torch.int64 .*; cast the input to torch.float32$"):
        cpp_layer.forward(to_dlpack(torch.ones(3, 4, dtype=torch.int64)))


@pytest.mark.parametrize("name", ["Linear", "WSLinear"])
def test_cpp_linear_without_inputs_is_torch_nn_s(name):
    """in_features = 0: no weight values to draw (torch.nn skips the init), a zero bias, a zero output."""
    python_layer = getattr(mth.snn, name)(0, 3)
    cpp_layer = getattr(mth._C, name)(0, 3)
    bias = from_dlpack(cpp_layer.named_parameters()["bias"])
    assert torch.equal(bias, torch.zeros(3)) and torch.equal(python_layer.bias.detach(), bias)
    x = torch.randn(2, 4, 0)
    torch.testing.assert_close(from_dlpack(cpp_layer.forward(to_dlpack(x))), python_layer(x))


def cpp_arguments(kwargs):
    """The Python constructor's arguments as _C takes them: sizes as lists."""
    return {k: ([v] if isinstance(v, int) and not isinstance(v, bool) and k not in ("in_channels", "out_channels", "groups")
                else list(v) if isinstance(v, tuple) else v)
            for k, v in kwargs.items()}


@pytest.mark.parametrize("sample", LAYER_CONV_SAMPLES, ids=lambda s: s.id)
def test_cpp_convolutions_match_the_python_classes(sample):
    name, kwargs, size = sample.name, sample.kwargs, sample.size
    python_layer = getattr(mth.snn, name)(**kwargs)
    cpp_layer = cpp_twin(python_layer, getattr(mth._C, name)(**cpp_arguments(kwargs)))
    for shape in [(3, 2, kwargs["in_channels"], *size), (2, kwargs["in_channels"], *size)]:
        x = torch.randn(shape)
        torch.testing.assert_close(from_dlpack(cpp_layer.forward(to_dlpack(x))), python_layer(x))


def test_cpp_conv_transpose_output_size_and_initialisation():
    python_layer = mth.snn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
    cpp_layer = cpp_twin(python_layer, mth._C.ConvTranspose2d(3, 2, [3], stride=[2], padding=[1]))
    x = torch.randn(2, 4, 3, 7, 6)
    torch.testing.assert_close(from_dlpack(cpp_layer.forward(to_dlpack(x), [14, 12])),
                               python_layer(x, output_size=[14, 12]))
    weight = from_dlpack(mth._C.Conv2d(8, 16, [3]).named_parameters()["weight"])
    bound = 1 / (8 * 9) ** 0.5  # fan_in = in_channels * kernel area, as torch.nn
    assert weight.shape == (16, 8, 3, 3) and 0.9 * bound < weight.abs().max() <= bound


def test_cpp_conv_repr_and_constructor_errors():
    assert repr(mth._C.Conv2d(3, 8, [3], padding="same", padding_mode="circular")) == (
        "matterhorn::snn::Conv2d(3, 8, kernel_size=[3, 3], stride=[1, 1], padding=same, dilation=[1, 1], "
        "groups=1, bias=true, padding_mode=circular)")
    with pytest.raises(ValueError, match=r"Conv2d: in_channels and out_channels must be divisible by groups"):
        mth._C.Conv2d(3, 8, [3], groups=2)
    for make, message in [(lambda: mth._C.Conv2d(3, 8, []), r"Conv2d: kernel_size must hold 1 or 2 values, got \[\]"),
                          (lambda: mth._C.WSConv3d(3, 8, [3], padding=[1, 2]),
                           r"WSConv3d: padding must hold 1 or 3 values, got \[1, 2\]"),
                          (lambda: mth._C.ConvTranspose1d(3, 8, [3], output_padding=[0, 0]),
                           r"ConvTranspose1d: output_padding must hold 1 value, got \[0, 0\]")]:
        with pytest.raises(ValueError, match=message):
            make()
    with pytest.raises(ValueError, match=r"ConvTranspose3d: stride must be >= 1, got \[1, 0, 1\]"):
        mth._C.ConvTranspose3d(2, 2, [3], stride=[1, 0, 1])
    with pytest.raises(ValueError, match=r"Conv1d: padding='same' is not supported for strided convolutions"):
        mth._C.Conv1d(2, 2, [3], stride=[2], padding="same")


BN_CASES = [
    ("BatchNorm1d", dict(num_features=3), (4, 2, 3)),
    ("BatchNorm1d", dict(num_features=3, momentum=None, per_step=True), (4, 2, 3, 5)),
    ("BatchNorm2d", dict(num_features=3, affine=False), (3, 2, 3, 4, 5)),
    ("BatchNorm2d", dict(num_features=3, per_step=True, batch_first=True), (2, 3, 3, 4, 5)),
    ("BatchNorm3d", dict(num_features=2, track_running_stats=False, eps=1e-3), (2, 2, 2, 3, 3, 3)),
]


@pytest.mark.parametrize("case", BN_CASES, ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[1].values()))}")
def test_cpp_batch_norm_matches_python_in_training_and_eval(case):
    name, kwargs, shape = case
    python_layer = getattr(mth.snn, name)(**kwargs)
    with torch.no_grad():
        for p in python_layer.parameters():
            p.uniform_(0.5, 1.5)
    cpp_layer = cpp_twin(python_layer, getattr(mth._C, name)(**kwargs))
    for _ in range(3):  # training: batch statistics, running statistics updated
        x = torch.randn(shape) * 2 + 1
        torch.testing.assert_close(from_dlpack(cpp_layer.forward(to_dlpack(x))), python_layer(x))
    for name_, buffer in python_layer.named_buffers():
        torch.testing.assert_close(from_dlpack(cpp_layer.named_buffers()[name_]), buffer)
    python_layer.eval(), cpp_layer.train(False)
    x = torch.randn(shape)
    torch.testing.assert_close(from_dlpack(cpp_layer.forward(to_dlpack(x))), python_layer(x))


TEMPORAL_CASES = [
    ("ThresholdDependentBatchNorm1d", (0.5, 2.0, 3), dict(), (4, 2, 3, 5)),
    ("TemporalEffectiveBatchNorm2d", (3, 3), dict(momentum=None), (3, 2, 3, 4, 5)),
    ("TemporalEffectiveBatchNorm3d", (2, 2), dict(batch_first=True), (2, 2, 2, 3, 3, 3)),
    ("BatchNormThroughTime1d", (4, 3), dict(), (4, 2, 3)),
    ("BatchNormThroughTime2d", (3, 3), dict(affine=False, batch_first=True), (2, 3, 3, 4, 5)),
    ("BatchNormThroughTime3d", (2, 2), dict(track_running_stats=False), (2, 2, 2, 3, 3, 3)),
]


@pytest.mark.parametrize("case", TEMPORAL_CASES, ids=lambda c: c[0])
def test_cpp_temporal_norm_matches_python_in_training_and_eval(case):
    name, positional, kwargs, shape = case
    python_layer = getattr(mth.snn, name)(*positional, **kwargs)
    cpp_layer = getattr(mth._C, name)(*positional, **kwargs)
    cpp_state = {**cpp_layer.named_parameters(), **cpp_layer.named_buffers()}
    assert set(cpp_state) == set(python_layer.state_dict())
    for n, value in python_layer.state_dict().items():  # same shapes and initial values
        assert torch.equal(from_dlpack(cpp_state[n]), value), n
    with torch.no_grad():
        for p in python_layer.parameters():
            p.uniform_(0.5, 1.5)
    cpp_layer = cpp_twin(python_layer, cpp_layer)
    for _ in range(3):
        x = torch.randn(shape) * 2 + 1
        torch.testing.assert_close(from_dlpack(cpp_layer.forward(to_dlpack(x))), python_layer(x))
    for name_, buffer in python_layer.named_buffers():
        torch.testing.assert_close(from_dlpack(cpp_layer.named_buffers()[name_]), buffer)
    python_layer.eval(), cpp_layer.train(False)
    x = torch.randn(shape)
    torch.testing.assert_close(from_dlpack(cpp_layer.forward(to_dlpack(x))), python_layer(x))


@pytest.mark.parametrize("kwargs", [dict(), dict(elementwise_affine=False), dict(bias=False)])
def test_cpp_layer_norm_matches_python(kwargs):
    python_layer = mth.snn.LayerNorm((4, 5), **kwargs)
    with torch.no_grad():
        for p in python_layer.parameters():
            p.uniform_(0.5, 1.5)
    cpp_layer = cpp_twin(python_layer, mth._C.LayerNorm([4, 5], **kwargs))
    for shape in [(3, 2, 4, 5), (2, 4, 5), (3, 2, 6, 4, 5)]:
        x = torch.randn(shape)
        torch.testing.assert_close(from_dlpack(cpp_layer.forward(to_dlpack(x))), python_layer(x))


def test_cpp_normalization_repr_and_errors():
    assert repr(mth._C.BatchNorm2d(4, momentum=None, per_step=True)) == (
        "matterhorn::snn::BatchNorm2d(4, eps=1e-05, momentum=None, affine=true, track_running_stats=true, "
        "step_mode='m', per_step=true)")
    with pytest.raises(ValueError, match=r"BatchNorm2d\(num_features=4\): expected 4 channels at dimension 2"):
        mth._C.BatchNorm2d(4).forward(to_dlpack(torch.randn(2, 3, 5, 4, 4)))
    with pytest.raises(ValueError, match=r"LayerNorm: normalized_shape must hold sizes >= 1"):
        mth._C.LayerNorm([4, 0])
    for layer_norm in (mth._C.LayerNorm, mth.snn.LayerNorm):
        with pytest.raises(ValueError, match=r"LayerNorm: normalized_shape must hold at least one size, got \[\]"):
            layer_norm([])
    bntt = mth._C.BatchNormThroughTime2d(3, 4, affine=False, track_running_stats=False, batch_first=True)
    with pytest.raises(ValueError, match=r"BatchNormThroughTime2d: expected T = 3 time steps \(the layer's T\), "
                                         r"got 2 in input \[0, 2, 4, 5, 5\] \(batch_first"):
        bntt.forward(to_dlpack(torch.randn(0, 2, 4, 5, 5)))
