"""mth.fuse: BatchNorm folded into the Linear / convolution before it, for inference. The fused
model's eval output equals the unfused one (our layers and torch.nn's, every convolution rank,
transposed, grouped and bias-free convolutions, affine=False, per_step, both modes, nested
Sequentials); the original is untouched; what cannot be folded is refused; the fused model
scripts, exports and runs in C++ (matterhorn_run_model, matterhorn_serve)."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

import matterhorn_pytorch as mth
from conftest import run_model_in_cpp
from samples import assert_within, sum_error
from test_serve import infer, start_server

T, B = 3, 2
snn = mth.snn


def randomise_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so that a wrong fold shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                if module.running_mean is not None:
                    module.running_mean.uniform_(-1, 1)
                    module.running_var.uniform_(0.3, 3)
                if module.weight is not None:
                    module.weight.uniform_(0.5, 2).mul_(torch.randint(0, 2, module.weight.shape) * 2 - 1)
                if module.bias is not None:
                    module.bias.uniform_(-1, 1)
    return model


def fan_in(model: nn.Module) -> int:
    """The most terms any output value of a layer sums: the weight's values per output channel."""
    return max(m.weight.numel() // (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
               for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)))


def assert_fused_equal(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """fuse(model) in float64: no BatchNorm left, same output. Each layer's sum of K terms (plus
    the fold's and BatchNorm's few roundings) is off by at most gamma_{K+4} times the sum of the
    magnitudes, which the same network with |weights| on |x| bounds (ReLU passes it through);
    both sides err, and a network of L layers compounds it L times."""
    model = randomise_statistics(model).double().eval()
    x = x.double()
    fused = mth.fuse(model)
    assert not any(isinstance(m, _BatchNorm) for m in fused.modules()), fused
    expected, actual = model(x), fused(x)
    magnitude = copy.deepcopy(fused)
    with torch.no_grad():
        for parameter in magnitude.parameters():
            parameter.abs_()
    layers = sum(1 for m in fused.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)))
    bound = 2 * layers * sum_error(fan_in(fused) + 4, torch.float64) * magnitude(x.abs())
    assert_within(actual, expected, bound)
    return fused


PAIRS = {
    "Conv1d": (lambda: snn.Conv1d(3, 4, 3, padding=1), lambda: snn.BatchNorm1d(4), (T, B, 3, 7)),
    "Conv2d": (lambda: snn.Conv2d(3, 4, 3, stride=2), lambda: snn.BatchNorm2d(4), (T, B, 3, 7, 7)),
    "Conv3d": (lambda: snn.Conv3d(3, 4, 2, padding="same"), lambda: snn.BatchNorm3d(4), (T, B, 3, 4, 4, 4)),
    "ConvTranspose1d groups=2": (lambda: snn.ConvTranspose1d(4, 6, 3, stride=2, groups=2),
                                 lambda: snn.BatchNorm1d(6), (T, B, 4, 5)),
    "ConvTranspose2d": (lambda: snn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
                        lambda: snn.BatchNorm2d(4), (T, B, 3, 4, 4)),
    "ConvTranspose3d bias=False groups=3": (lambda: snn.ConvTranspose3d(3, 6, 2, groups=3, bias=False),
                                            lambda: snn.BatchNorm3d(6), (T, B, 3, 3, 3, 3)),
    "Linear + BatchNorm1d": (lambda: snn.Linear(5, 6), lambda: snn.BatchNorm1d(6), (T, B, 5)),
    "Linear bias=False + per_step BatchNorm1d": (lambda: snn.Linear(5, 6, bias=False),
                                                 lambda: snn.BatchNorm1d(6, per_step=True), (T, B, 5)),
    "Conv2d bias=False groups=2 + affine=False": (lambda: snn.Conv2d(4, 6, 3, groups=2, bias=False),
                                                  lambda: snn.BatchNorm2d(6, affine=False), (T, B, 4, 5, 5)),
    "Conv2d reflect + per_step, BatchNorm bias=False": (
        lambda: snn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        lambda: snn.BatchNorm2d(4, per_step=True, bias=False), (T, B, 3, 5, 5)),
    "single-step Conv2d": (lambda: snn.Conv2d(3, 4, 3, multi_time_step=False),
                           lambda: snn.BatchNorm2d(4, multi_time_step=False), (B, 3, 5, 5)),
    "single-step Linear": (lambda: snn.Linear(5, 6, multi_time_step=False),
                           lambda: snn.BatchNorm1d(6, multi_time_step=False), (B, 5)),
    "batch_first per_step": (lambda: snn.Conv2d(3, 4, 3, batch_first=True),
                             lambda: snn.BatchNorm2d(4, per_step=True, batch_first=True), (B, T, 3, 5, 5)),
    "torch.nn Conv2d + BatchNorm2d": (lambda: nn.Conv2d(3, 4, 3), lambda: nn.BatchNorm2d(4), (B, 3, 5, 5)),
    "torch.nn ConvTranspose3d + BatchNorm3d": (lambda: nn.ConvTranspose3d(3, 4, 2, bias=False),
                                               lambda: nn.BatchNorm3d(4), (B, 3, 3, 3, 3)),
    "torch.nn Linear + BatchNorm1d": (lambda: nn.Linear(5, 6), lambda: nn.BatchNorm1d(6, affine=False), (B, 5)),
    "torch.nn Conv1d + our BatchNorm1d": (lambda: nn.Conv1d(3, 4, 3), lambda: snn.BatchNorm1d(4, multi_time_step=False),
                                           (B, 3, 6)),
}


@pytest.mark.parametrize("name", PAIRS)
def test_fused_pair_equals_unfused(name):
    layer, bn, shape = PAIRS[name]
    model = nn.Sequential(layer(), bn(), nn.ReLU())
    fused = assert_fused_equal(model, torch.randn(shape))
    assert isinstance(fused[1], nn.Identity) and type(fused[0]) is type(model[0])
    assert fused[0].bias is not None and fused[0].weight.dtype == torch.float64


def test_nested_sequentials_and_pairs_across_boundaries():
    model = nn.Sequential(
        nn.Sequential(snn.Conv2d(2, 4, 3, padding=1), snn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Sequential(snn.ConvTranspose2d(4, 3, 2, stride=2), snn.BatchNorm2d(3))),
        snn.Conv2d(3, 3, 1),  # followed by a BatchNorm in another Sequential: not a direct pair
        nn.Sequential(snn.BatchNorm2d(3), snn.Conv2d(3, 2, 1), snn.BatchNorm2d(2), snn.BatchNorm2d(2)),
    )
    model = randomise_statistics(model).double().eval()
    x = torch.randn(T, B, 2, 4, 4, dtype=torch.float64)
    fused = mth.fuse(model)
    kinds = [type(m).__name__ for m in fused.modules() if not isinstance(m, nn.Sequential)]
    assert kinds == ["Conv2d", "Identity", "ReLU", "ConvTranspose2d", "Identity", "Conv2d",
                     "BatchNorm2d", "Conv2d", "Identity", "BatchNorm2d"], kinds
    # The names of the other layers stay: the fused state_dict is the original's minus the folded
    # BatchNorms' entries.
    assert set(fused.state_dict()) == {k for k in model.state_dict() if not k.startswith(("0.1.", "1.0.1.", "3.2."))}
    torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


def test_original_untouched_and_float32_kept():
    model = randomise_statistics(nn.Sequential(snn.Conv2d(2, 4, 3, bias=False), snn.BatchNorm2d(4))).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(T, B, 2, 5, 5)
    expected = model(x)
    fused = mth.fuse(model)
    assert model[0].bias is None and isinstance(model[1], snn.BatchNorm2d) and not model.training
    assert before.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert fused[0].weight.dtype == torch.float32 and fused[0].weight.data_ptr() != model[0].weight.data_ptr()
    assert torch.equal(model(x), expected)
    # float32: a sum of 18 terms and the fold's roundings.
    scale = (model[1].running_var + model[1].eps).rsqrt() * model[1].weight
    magnitude = nn.functional.conv2d(x.abs().flatten(0, 1), model[0].weight.abs()).unflatten(0, (T, B))
    bound = 2 * sum_error(18 + 4) * (magnitude * scale.abs().view(-1, 1, 1) + model[1].bias.abs().view(-1, 1, 1)
                                     + (model[1].running_mean * scale).abs().view(-1, 1, 1))
    assert_within(fused(x), expected, bound)


def test_training_mode_is_refused():
    model = nn.Sequential(snn.Conv2d(2, 4, 3), snn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="training mode.*model.eval()"):
        mth.fuse(model)
    model.eval()
    model[1].train()  # one submodule in training is enough to refuse
    with pytest.raises(ValueError, match=r"training mode \(1\)"):
        mth.fuse(model)
    with pytest.raises(TypeError, match="mth.fuse: expected an eager nn.Module"):
        mth.fuse(torch.zeros(1))
    with pytest.raises(TypeError, match=r"got RecursiveScriptModule \(fuse before torch.jit.script"):
        mth.fuse(torch.jit.script(model.eval()))


@pytest.mark.parametrize("bn", [snn.BatchNorm2d, nn.BatchNorm2d])
def test_batch_norm_with_negative_eps_is_refused(bn):
    model = nn.Sequential(snn.Conv2d(2, 4, 3), bn(4, eps=-1e-3)).eval()
    with pytest.raises(ValueError, match=r"fuse: 1 \(BatchNorm2d\): eps must be non-negative, got -0.001"):
        mth.fuse(model)


@pytest.mark.parametrize("bn", [snn.BatchNorm2d, nn.BatchNorm2d])
def test_batch_norm_without_running_statistics_is_refused(bn):
    model = nn.Sequential(nn.Sequential(snn.Conv2d(2, 4, 3), bn(4, track_running_stats=False))).eval()
    with pytest.raises(ValueError, match=r"0\.1 \(BatchNorm2d\) has track_running_stats=False"):
        mth.fuse(model)


def test_layers_that_are_not_plain_are_left_alone():
    class ScaledConv(snn.Conv2d):  # a subclass may derive its weight: folding into it could be wrong
        def forward(self, o):
            return self._conv_forward(o, self.weight * 2)

    for layer in [ScaledConv(2, 4, 3), snn.WSConv2d(2, 4, 3), snn.WSLinear(2, 4)]:
        model = randomise_statistics(nn.Sequential(layer, snn.BatchNorm2d(4))).eval()
        fused = mth.fuse(model)
        assert isinstance(fused[1], snn.BatchNorm2d) and fused[0].weight.data_ptr() != layer.weight.data_ptr()
        assert torch.equal(fused[0].weight, layer.weight)
    class StepScaled(snn.BatchNorm2d):  # a BatchNorm that does more than x * scale + shift
        def forward(self, input):
            return super().forward(input) * 2

    class Initialised(snn.BatchNorm2d):  # another initialisation only: folds
        pass

    model = randomise_statistics(nn.Sequential(snn.Conv2d(2, 4, 3), StepScaled(4), Initialised(4))).eval()
    fused = mth.fuse(model)
    assert isinstance(fused[1], StepScaled) and isinstance(fused[2], Initialised)
    model = randomise_statistics(nn.Sequential(snn.Conv2d(2, 4, 3), Initialised(4))).eval()
    assert isinstance(mth.fuse(model)[1], nn.Identity)
    # A BatchNorm over other channels than the layer's outputs is not a pair either.
    model = nn.Sequential(snn.Linear(4, 6), snn.BatchNorm1d(3)).eval()
    assert isinstance(mth.fuse(model)[1], snn.BatchNorm1d)


@pytest.mark.parametrize("layer,bn,shape", [
    (lambda: snn.Linear(4, 4), lambda: snn.BatchNorm2d(4), (T, B, 4, 5, 4)),
    (lambda: snn.Linear(4, 4), lambda: snn.BatchNorm3d(4), (T, B, 4, 2, 3, 4)),
    (lambda: nn.Linear(4, 4), lambda: nn.BatchNorm2d(4), (B, 4, 5, 4)),
    (lambda: snn.Conv1d(4, 4, 1), lambda: snn.BatchNorm2d(4), (T, 4, 4, 6)),
    (lambda: snn.Conv2d(4, 4, 1), lambda: snn.BatchNorm3d(4), (T, 4, 4, 3, 3)),
    (lambda: snn.ConvTranspose2d(4, 4, 1, multi_time_step=False), lambda: snn.BatchNorm1d(4), (4, 4, 4, 3)),
], ids=["Linear+BatchNorm2d", "Linear+BatchNorm3d", "torch.nn Linear+BatchNorm2d", "Conv1d+BatchNorm2d",
        "Conv2d+BatchNorm3d", "ConvTranspose2d+BatchNorm1d"])
def test_batch_norm_of_another_rank_is_not_a_pair(layer, bn, shape):
    """A BatchNorm{D}d normalizes dimension 1 or 2 of a rank-D layout: after a layer of another
    rank (a Linear's features are last) it normalizes another dimension than the layer's outputs,
    even with as many features, and folding it would change the result."""
    model = randomise_statistics(nn.Sequential(layer(), bn())).double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    fused = mth.fuse(model)
    assert type(fused[1]) is type(model[1])
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


def test_a_layer_used_elsewhere_keeps_its_weights_there():
    """The pair gets a folded copy of the layer: another use of the same module (a tied layer, a
    second reference) still computes with the unfolded weights."""
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(snn.Linear(4, 4), snn.BatchNorm1d(4))
            self.head = self.body[0]

        def forward(self, x):
            return self.body(x) + self.head(x)

    x = torch.randn(T, B, 4, dtype=torch.float64)
    for model in (nn.Sequential(snn.Linear(4, 4), snn.BatchNorm1d(4), nn.ReLU(), snn.Linear(4, 4)), TwoUses()):
        if isinstance(model, nn.Sequential):
            model[3] = model[0]  # the same Linear twice
        model = randomise_statistics(model).double().eval()
        fused = mth.fuse(model)
        assert not any(isinstance(m, _BatchNorm) for m in fused.modules())
        torch.testing.assert_close(fused(x), model(x))


def conv_bn_net() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(
        snn.Conv2d(2, 4, 3, padding=1), snn.BatchNorm2d(4), nn.ReLU(),
        snn.ConvTranspose2d(4, 3, 2, stride=2, bias=False), snn.BatchNorm2d(3, per_step=True), nn.ReLU(),
        nn.Flatten(2), snn.Linear(3 * 12 * 12, 5), snn.BatchNorm1d(5),
    )
    return randomise_statistics(model).eval()


def float32_bound(model, fused, x):
    """Both float32 networks against each other: three layers of at most 36 * 4 terms each."""
    magnitude = copy.deepcopy(fused)
    with torch.no_grad():
        for parameter in magnitude.parameters():
            parameter.abs_()
    return 2 * 3 * sum_error(3 * 12 * 12 + 4) * magnitude(x.abs())


def test_fused_model_scripts_exports_and_runs_in_cpp(tmp_path):
    model = conv_bn_net()
    fused = mth.fuse(model)
    x = torch.rand(T, B, 2, 6, 6).bernoulli()
    expected = fused(x)
    assert_within(expected, model(x), float32_bound(model, fused, x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warning
        scripted = torch.jit.script(fused)
    scripted.save(str(tmp_path / "fused.pt"))
    # The same ops in the same order: only the thread count may differ.
    torch.testing.assert_close(scripted(x), expected)
    torch.testing.assert_close(run_model_in_cpp(tmp_path / "fused.pt", x, tmp_path), expected)
    t, b = torch.export.Dim("T", min=1), torch.export.Dim("B", min=1)
    exported = torch.export.export(fused, (x,), dynamic_shapes=({0: t, 1: b},))
    y = torch.rand(5, 1, 2, 6, 6).bernoulli()
    torch.testing.assert_close(exported.module()(y), fused(y))
    assert not any("batch_norm" in str(node.target) for node in exported.graph.nodes)


def test_fused_model_is_served(tmp_path):
    fused = mth.fuse(conv_bn_net())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(fused).save(str(tmp_path / "fused.pt"))
    x = torch.rand(T, B, 2, 6, 6).bernoulli()
    with start_server(tmp_path / "fused.pt") as (_, port):
        status, headers, body = infer(port, x)
    assert status == 200 and headers["X-Shape"] == f"{T},{B},5", (status, body)
    torch.testing.assert_close(torch.frombuffer(bytearray(body), dtype=torch.float32).view(T, B, 5), fused(x))


def test_cpp_fuse_matches_python_fuse():
    """matterhorn::snn::fuse on a torch::nn::Sequential of our C++ modules (bound in _C) gives the
    parameters and output of mth.fuse on the same network in Python."""
    from torch.utils.dlpack import from_dlpack, to_dlpack

    C = mth._C
    python = randomise_statistics(nn.Sequential(
        snn.Conv2d(2, 4, 3, padding=1, bias=False), snn.BatchNorm2d(4),
        snn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), snn.BatchNorm2d(6, affine=False, per_step=True),
        snn.Conv2d(6, 3, 1), snn.LayerNorm([12, 12]), snn.BatchNorm2d(3),  # LayerNorm between: no pair
        snn.Conv2d(3, 3, 1), snn.ThresholdDependentBatchNorm2d(1.0, 0.5, 3),
        snn.Conv2d(3, 3, 1), snn.TemporalEffectiveBatchNorm2d(T, 3),  # a scale per step: no pair
        snn.Conv2d(3, 3, 1), snn.BatchNormThroughTime2d(T, 3),  # statistics per step: no pair
    )).eval()
    with torch.no_grad():
        python[10].scale.uniform_(0.5, 2)
    cpp = C.Sequential([
        C.Conv2d(2, 4, [3], padding=[1], bias=False), C.BatchNorm2d(4),
        C.ConvTranspose2d(4, 6, [2], stride=[2], groups=2), C.BatchNorm2d(6, affine=False, per_step=True),
        C.Conv2d(6, 3, [1]), C.LayerNorm([12, 12]), C.BatchNorm2d(3),
        C.Conv2d(3, 3, [1]), C.ThresholdDependentBatchNorm2d(1.0, 0.5, 3),
        C.Conv2d(3, 3, [1]), C.TemporalEffectiveBatchNorm2d(T, 3),
        C.Conv2d(3, 3, [1]), C.BatchNormThroughTime2d(T, 3),
    ])
    state = {**dict(python.named_parameters()), **dict(python.named_buffers())}
    cpp.load_parameters({name: to_dlpack(tensor.detach()) for name, tensor in state.items()})
    with pytest.raises(ValueError, match=r"training mode \(the Sequential\).*eval\(\)"):
        cpp.fuse()
    cpp.train(False)
    fused_cpp, fused_python = cpp.fuse(), mth.fuse(python)
    parameters = {name: from_dlpack(t) for name, t in fused_cpp.named_parameters().items()}
    assert parameters.keys() == dict(fused_python.named_parameters()).keys()
    for name, parameter in fused_python.named_parameters():
        torch.testing.assert_close(parameters[name], parameter.detach(), rtol=0, atol=0, msg=name)
    x = torch.rand(T, B, 2, 6, 6).bernoulli()
    torch.testing.assert_close(from_dlpack(fused_cpp.forward(to_dlpack(x))), fused_python(x))
    # The original C++ model is unchanged and still gives the unfused output.
    torch.testing.assert_close(from_dlpack(cpp.forward(to_dlpack(x))), python(x))
    assert "1.running_mean" in cpp.named_buffers() and "1.running_mean" not in fused_cpp.named_buffers()
    assert "6.running_mean" in fused_cpp.named_buffers()  # after the LayerNorm: not folded
    assert "8.running_mean" not in fused_cpp.named_buffers()  # tdBN folds
    assert {"10.running_mean", "12.running_mean"} <= set(fused_cpp.named_buffers())  # TEBN, BNTT stay

    refused = C.Sequential([C.Linear(3, 4), C.BatchNorm1d(4, track_running_stats=False)])
    refused.train(False)
    with pytest.raises(ValueError, match=r"fuse: 1 \(BatchNorm1d\) has track_running_stats=false"):
        refused.fuse()
    refused = C.Sequential([C.Linear(3, 4), C.BatchNorm1d(4, eps=-1e-3)])
    refused.train(False)
    with pytest.raises(ValueError, match=r"fuse: 1 \(BatchNorm1d\): eps must be non-negative"):
        refused.fuse()


def test_cpp_fuse_pairs_only_a_batch_norm_of_the_layer_rank():
    from torch.utils.dlpack import from_dlpack, to_dlpack

    C = mth._C
    for layer, bn, shape in [(C.Linear(4, 4), C.BatchNorm2d(4), (T, B, 4, 5, 4)),
                             (C.Conv1d(4, 4, [1]), C.BatchNorm2d(4), (T, 4, 4, 6)),
                             (C.Linear(4, 4), C.BatchNorm1d(4), (T, B, 4))]:
        model = C.Sequential([layer, bn])
        model.train(False)
        fused = model.fuse()
        x = torch.randn(shape)
        folded = "1.running_mean" not in fused.named_buffers()
        assert folded == (shape == (T, B, 4)), shape
        torch.testing.assert_close(from_dlpack(fused.forward(to_dlpack(x))), from_dlpack(model.forward(to_dlpack(x))))
