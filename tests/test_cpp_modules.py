"""The C++ modules (matterhorn::snn::*, bound in _C) against the Python classes."""

import pytest
import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

import matterhorn_pytorch as mth


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
    cpp_layer = mth._C.Linear(100, 30, multi_time_step=False)
    weight = from_dlpack(cpp_layer.named_parameters()["weight"])
    assert weight.shape == (30, 100)
    assert 0.9 * 0.1 < weight.abs().max() <= 0.1  # U(-1/sqrt(in), 1/sqrt(in)), as torch.nn
    assert repr(cpp_layer) == "matterhorn::snn::Linear(in_features=100, out_features=30, bias=true, step_mode='s')"


def test_cpp_linear_errors_keep_their_python_types():
    cpp_layer = mth._C.Linear(4, 2)
    with pytest.raises(ValueError, match=r"got \[3, 5\]"):
        cpp_layer.forward(to_dlpack(torch.randn(3, 5)))
    with pytest.raises(TypeError, match="dtype"):
        cpp_layer.forward(to_dlpack(torch.randn(3, 4, dtype=torch.float64)))
    with pytest.raises(KeyError, match="no parameter named 'gain'"):
        cpp_layer.load_parameters({"gain": to_dlpack(torch.ones(2))})
