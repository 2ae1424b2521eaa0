"""Every layer class that mth.snn exports, discovered rather than listed: script and trace
round-trips in both modes, and the saved file run by the C++ program, for two T, B values."""

import inspect
import warnings

import pytest
import torch
import torch.nn as nn

import matterhorn_pytorch as mth
from conftest import run_model_in_cpp

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

LAYERS = sorted(
    name for name, cls in vars(mth.snn).items()
    if inspect.isclass(cls) and issubclass(cls, mth.snn.Synapse) and cls is not mth.snn.Synapse
)


# The temporal normalizations are multi-step only; TEBN's and BNTT's T is fixed at construction.
MULTI_STEP_ONLY = {n for n in LAYERS if n.startswith(("ThresholdDependent", "TemporalEffective", "BatchNormThroughTime"))}
STEPS = 3


def steps(name, T):
    """T for an input of the layer: its own for a layer with a fixed T."""
    return STEPS if "T" in inspect.signature(getattr(mth.snn, name)).parameters else T


def example(name):
    """A small instance of the layer and the size of one time step's input ([B, ...] without B).
    Built from the constructor's signature, so a new layer family fails here until it is covered."""
    cls = getattr(mth.snn, name)
    parameters = inspect.signature(cls).parameters
    spatial = {"1d": (7,), "2d": (5, 6), "3d": (3, 4, 5)}.get(name[-2:], ())
    if "in_features" in parameters:
        return cls(6, 4), (6,)
    if "kernel_size" in parameters:
        return cls(2, 4, 3, padding=1), (2, *spatial)
    if "v_th" in parameters:  # tdBN: (alpha, v_th, num_features)
        return cls(0.5, 2.0, 3), (3, *spatial)
    if "T" in parameters:  # TEBN, BNTT: a fixed number of steps
        return cls(STEPS, 3), (3, *spatial)
    if "num_features" in parameters:
        return cls(3), (3, *spatial)
    if "normalized_shape" in parameters:
        return cls((2, 5)), (3, 2, 5)
    raise AssertionError(f"no example for {name}: add one here")


class LIF(mth.snn.Module):
    """A simple Python-defined neuron (multi-step), scriptable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.zeros_like(x[0])
        spikes = []
        for t in range(x.shape[0]):
            u = 0.5 * (u + x[t])
            spike = (u > 0.2).to(x.dtype)
            u = u * (1.0 - spike)
            spikes.append(spike)
        return torch.stack(spikes)


def trained(layer, step):
    layer.train()
    with torch.no_grad():  # BatchNorm: running statistics that are not the initial ones
        for _ in range(2):
            layer(torch.randn(3, 4, *step) * 2 + 1)
    return layer.eval()


@pytest.mark.parametrize("export", ["script", "trace"])
@pytest.mark.parametrize("mode", ["multi-step", "single-step"])
@pytest.mark.parametrize("name", LAYERS)
def test_layer_round_trips_and_runs_in_cpp(name, mode, export, tmp_path):
    layer, step = example(name)
    layer = trained(layer, step)
    shapes = [(3, 2, *step), (steps(name, 2), 5, *step)] if mode == "multi-step" else [(2, *step), (5, *step)]
    if mode == "single-step" and name in MULTI_STEP_ONLY:
        with pytest.raises(ValueError, match=rf"{name}: a multi-step layer"):
            layer.single_step_mode_()
        return
    if mode == "single-step":
        layer.single_step_mode_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.jit.script(layer) if export == "script" else torch.jit.trace(layer, torch.randn(shapes[0]))
    path = tmp_path / "layer.pt"
    exported.save(str(path))
    loaded = torch.jit.load(str(path))
    for shape in shapes:  # two T, B (or B) values through the same file
        x = torch.randn(shape)
        expected = layer(x)
        torch.testing.assert_close(loaded(x), expected)
        torch.testing.assert_close(run_model_in_cpp(path, x, tmp_path), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_in_a_sequential_with_torch_layers_and_a_python_neuron(name, tmp_path):
    layer, step = example(name)
    model = nn.Sequential(layer, nn.Tanh(), LIF(), nn.Dropout(0.5))
    model = trained(model, step)
    x = torch.randn(steps(name, 4), 3, *step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    torch.testing.assert_close(torch.jit.load(str(path))(x), model(x))
    torch.testing.assert_close(run_model_in_cpp(path, x, tmp_path), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LAYERS)
def test_an_input_on_another_device_than_the_layer_names_both(name):
    # the meta device stands in for a second device on any machine
    layer, step = example(name)
    x = torch.randn(3, 4, *step)
    with pytest.raises(ValueError, match=rf"^{name}: the input is on cpu but the layer's weight is on meta; "
                                         rf"move one of them with \.to\(device\)"):
        layer.to("meta")(x)
    with pytest.raises(ValueError, match=rf"^{name}: the input is on meta but the layer's weight is on cpu"):
        example(name)[0](x.to("meta"))
