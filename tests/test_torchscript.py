"""TorchScript: script and trace, and the saved file run by a C++ program with no Python."""

import warnings

import pytest
import torch
import torch.nn as nn

import matterhorn_pytorch as mth
from conftest import run_model_in_cpp
from models import MixedConvNet, NormNet

# torch 2.13 deprecates TorchScript; it still has to work, so its warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def trained(model):
    """A few training steps, so that the running statistics are not the initial ones."""
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 2, 6, 6) * 2 + 1)
    return model


def linear_network():
    return nn.Sequential(mth.snn.Linear(8, 16), mth.snn.Linear(16, 4)).eval()


NETWORKS = {
    "linear": (linear_network, (4, 3, 8), (2, 5, 8)),
    "all-six-convs": (lambda: MixedConvNet().eval(), (3, 2, 2, 8, 8), (2, 4, 2, 8, 8)),
    "norms": (lambda: trained(NormNet()).eval(), (3, 2, 2, 6, 6), (2, 4, 2, 6, 6)),
}


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("export", ["script", "trace"])
def test_round_trip_and_cpp_program_give_the_python_output(network, export, tmp_path):
    make, shape, other_shape = NETWORKS[network]
    model = make()
    x = torch.randn(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.jit.script(model) if export == "script" else torch.jit.trace(model, x)
    path = tmp_path / "model.pt"
    exported.save(str(path))
    loaded = torch.jit.load(str(path))
    expected = model(x)
    torch.testing.assert_close(loaded(x), expected)
    # another T and B through the same file (traced files too: the op folds whatever comes)
    x2 = torch.randn(other_shape)
    torch.testing.assert_close(loaded(x2), model(x2))
    torch.testing.assert_close(run_model_in_cpp(path, x, tmp_path), expected, rtol=1e-5, atol=1e-6)


def test_scripted_module_keeps_mode_and_single_step_input(tmp_path):
    model = nn.Sequential(mth.snn.Linear(8, 4, multi_time_step=False))
    scripted = torch.jit.script(model)
    x = torch.randn(3, 8)
    torch.testing.assert_close(scripted(x), model(x))
    assert scripted[0].step_mode == "s"


def test_scripted_user_synapse():
    class Scale(mth.snn.Synapse):
        def forward_step(self, o: torch.Tensor) -> torch.Tensor:
            return o * 3.0

    scripted = torch.jit.script(Scale())
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(scripted(x), x * 3.0)
