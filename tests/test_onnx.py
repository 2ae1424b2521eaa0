"""ONNX export: a network of every layer, in both modes, unfused and fused (mth.fuse), exported
with both of torch.onnx's exporters by a plain ``torch.onnx.export`` call, holds only standard ONNX
operators (the default domain, no custom one), and ONNX Runtime's output equals eager's, with
dynamic T and B (both exporters take them; the temporal normalizations fix T)."""

import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

import matterhorn_pytorch as mth
from samples import sum_error

snn = mth.snn
T, B = 3, 2


class EveryLayer(nn.Module):
    """Every layer of mth.snn (but MultiheadAttention, which is torch's own computation) on
    [T, B, 2, 6, 6] (multi-step) or [B, 2, 6, 6] (single-step). The Sequentials hold the pairs
    that mth.fuse folds; the BatchNorm with batch statistics stays."""

    def __init__(self, multi: bool):
        super().__init__()
        m = dict(multi_time_step=multi)
        self.block2d = nn.Sequential(
            snn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect", spike_input=True, **m), snn.BatchNorm2d(4, **m),
            nn.ReLU(),
            snn.ConvTranspose2d(4, 3, 2, stride=2, bias=False, **m), snn.BatchNorm2d(3, per_step=True, **m),
            nn.ReLU(), snn.Conv2d(3, 3, 2, padding="same", **m), snn.LayerNorm([12, 12]),
            snn.BatchNorm2d(3, track_running_stats=False, per_step=True, **m))  # batch statistics: not folded
        self.block1d = nn.Sequential(
            snn.Conv1d(2, 4, 3, padding=1, **m), snn.BatchNorm1d(4, **m),
            snn.ConvTranspose1d(4, 2, 3, stride=2, groups=2, **m), snn.BatchNorm1d(2, affine=False, **m))
        self.block3d = nn.Sequential(
            snn.Conv3d(2, 4, (3, 3, 1), padding=(1, 1, 0), padding_mode="circular", **m), snn.BatchNorm3d(4, **m),
            snn.ConvTranspose3d(4, 2, 1, **m), snn.BatchNorm3d(2, bias=False, **m))
        self.up = snn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, **m)
        self.ws = snn.WSConv2d(2, 2, 3, padding=1, **m)
        self.head = nn.Sequential(snn.WSLinear(1010, 16, **m), snn.Linear(16, 8, **m), snn.BatchNorm1d(8, **m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [
            self.block2d(x).flatten(-3),                                 # [..., 3 * 12 * 12]
            self.block1d(x.flatten(-2)).flatten(-2),                     # [..., 2 * 73]
            self.block3d(x.unsqueeze(-1)).flatten(-4),                   # [..., 2 * 36]
            self.up(x, output_size=[12, 12]).flatten(-3),                # [..., 2 * 144]
            self.ws(x).flatten(-3),                                      # [..., 2 * 36]
        ]
        return self.head(torch.cat(features, -1))


class Both(nn.Module):
    """The unfused and fused network of each mode, one export for all four."""

    def __init__(self):
        super().__init__()
        self.multi, self.single = randomised(EveryLayer(True)), randomised(EveryLayer(False))
        self.multi_fused, self.single_fused = mth.fuse(self.multi), mth.fuse(self.single)
        # In eval as a whole: the TorchScript exporter puts a training model in eval for the export
        # and then back into training, children included.
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.multi(x), self.multi_fused(x), self.single(y), self.single_fused(y)


def randomised(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm) and module.running_mean is not None:
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
            if isinstance(module, (snn.WSLinear, snn.WSConv2d)):
                module.gamma.uniform_(0.5, 1.5)
    return model.eval()


def spikes(*shape):
    return torch.rand(shape).bernoulli()


def export(model, inputs, path, dynamo: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        if dynamo:
            t, b, b1 = torch.export.Dim("T"), torch.export.Dim("B"), torch.export.Dim("B1")
            torch.onnx.export(model, inputs, path, dynamo=True, dynamic_shapes=({0: t, 1: b}, {0: b1}))
        else:
            torch.onnx.export(model, inputs, path, dynamo=False, input_names=["x", "y"],
                              dynamic_axes={"x": {0: "T", 1: "B"}, "y": {0: "B1"}})


def assert_standard_operators(path):
    """Every node, in the graph, its subgraphs and any local function, is an operator of the
    default ONNX domain that ONNX itself defines."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)

    def nodes(graph):
        for node in graph.node:
            yield node
            for attribute in node.attribute:
                for subgraph in list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else []):
                    yield from nodes(subgraph)

    all_nodes = list(nodes(model.graph)) + [n for function in model.functions for n in function.node]
    assert not model.functions or all(f.domain in ("", "ai.onnx") for f in model.functions), model.functions
    custom = {(n.domain, n.op_type) for n in all_nodes
              if n.domain not in ("", "ai.onnx") or not onnx.defs.has(n.op_type)}
    assert not custom, custom
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}, model.opset_import
    return {n.op_type for n in all_nodes}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_every_layer_exports_to_standard_onnx_and_runs_in_onnx_runtime(dynamo, tmp_path):
    model = Both()
    path = tmp_path / "model.onnx"
    export(model, (spikes(T, B, 2, 6, 6), spikes(B, 2, 6, 6)), path, dynamo)
    operators = assert_standard_operators(path)
    assert {"Conv", "ConvTranspose", "LayerNormalization", "Pad", "ReduceMean"} <= operators, operators
    assert {"Gemm", "MatMul"} & operators, operators
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    # Other T and B than the export's: the dimensions are dynamic in the file.
    for t, b in [(T, B), (5, 3)]:
        x, y = spikes(t, b, 2, 6, 6), spikes(b, 2, 6, 6)
        outputs = session.run(None, {names[0]: x.numpy(), names[1]: y.numpy()})
        with torch.no_grad():
            expected = model(x, y)
        for name, output, eager in zip(["multi", "multi fused", "single", "single fused"], outputs, expected):
            output = torch.from_numpy(output)
            assert output.shape == eager.shape, (name, output.shape, eager.shape)
            # Both sides sum at most 1010 terms per value in float32 (other kernels, other orders),
            # through normalisations that keep the values near 1: each errs by gamma_1010 times
            # the magnitudes, a few layers deep.
            bound = 2 * 4 * sum_error(1010) * eager.abs().max().item()
            error = (output - eager).abs().max().item()
            assert error <= bound, f"{name}: ONNX Runtime's output off by {error:.3g}, {bound:.3g} allowed"


def test_eager_runs_the_ops_again_after_an_export(tmp_path):
    model = EveryLayer(True).eval()
    x = spikes(T, B, 2, 6, 6)
    export_input = (x, spikes(B, 2, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Both(), export_input, tmp_path / "m.onnx", dynamo=False)
    assert not torch.onnx.is_in_onnx_export()
    profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with profile, torch.no_grad():
        model(x)
    names = {event.name for event in profile.events()}
    assert {"matterhorn::conv", "matterhorn::layer_norm"} <= names, names
    assert any(name.startswith("matterhorn::batch_norm") for name in names), names


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_batch_first_and_batch_statistics(dynamo, tmp_path):
    """[B, T, ...] input; BatchNorms with batch statistics per step and over everything."""
    m = dict(batch_first=True)
    model = nn.Sequential(
        snn.Conv1d(2, 4, 3, **m), snn.BatchNorm1d(4, track_running_stats=False, per_step=True, **m),
        snn.ConvTranspose1d(4, 3, 2, stride=2, **m), snn.BatchNorm1d(3, track_running_stats=False, **m),
        snn.Linear(8, 5, **m), snn.LayerNorm(5)).eval()
    x = torch.randn(B, T, 2, 6)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamic_shapes=({0: torch.export.Dim("B"), 1: torch.export.Dim("T")},))
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "B", 1: "T"}})
    assert_standard_operators(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, t in [(B, T), (4, 5)]:
        x = torch.randn(b, t, 2, 6)
        (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = model(x)
        # Sums of at most 8 terms, normalised three times: a few roundings each.
        torch.testing.assert_close(torch.from_numpy(output), expected, rtol=0, atol=64 * sum_error(8))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_the_layers_see_torchs_own_export_flag(dynamo, tmp_path):
    from matterhorn_pytorch.snn import _onnx

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((_onnx.exporting(), torch.onnx.is_in_onnx_export()))
            return x + 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Probe(), (torch.zeros(2),), tmp_path / "probe.onnx", dynamo=dynamo)
    assert seen and all(ours and torchs for ours, torchs in seen), seen
    assert not _onnx.exporting() and not torch.onnx.is_in_onnx_export()


class Temporal(nn.Module):
    """The temporal normalizations (multi-step only, T fixed by TEBN's and BNTT's parameters),
    unfused and fused (tdBN folds into the convolution; TEBN and BNTT stay)."""

    def __init__(self, batch_first: bool):
        super().__init__()
        m = dict(batch_first=batch_first)
        self.net = nn.Sequential(
            snn.Conv2d(2, 3, 3, padding=1, **m), snn.ThresholdDependentBatchNorm2d(1.0, 0.5, 3, **m),
            snn.TemporalEffectiveBatchNorm2d(T, 3, **m), snn.BatchNormThroughTime2d(T, 3, **m),
            snn.BatchNormThroughTime2d(T, 3, track_running_stats=False, **m))
        with torch.no_grad():
            self.net[2].scale.uniform_(0.5, 2)
            self.net[3].weight.uniform_(0.5, 2)
        randomised(self.net)
        self.fused = mth.fuse(self.net)
        self.eval()

    def forward(self, x: torch.Tensor):
        return self.net(x), self.fused(x)


@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch_first"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_temporal_normalizations(dynamo, batch_first, tmp_path):
    model = Temporal(batch_first)
    assert isinstance(model.fused[1], nn.Identity) and isinstance(model.fused[2], snn.TemporalEffectiveBatchNorm2d)
    batch = 0 if batch_first else 1
    shape = lambda b: (b, T, 2, 5, 5) if batch_first else (T, b, 2, 5, 5)  # noqa: E731
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (spikes(*shape(B)),), path, dynamic_shapes=({batch: torch.export.Dim("B")},))
        else:
            torch.onnx.export(model, (spikes(*shape(B)),), path, dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {batch: "B"}})
    assert_standard_operators(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in [B, 5]:
        x = spikes(*shape(b))
        outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = model(x)
        for output, eager in zip(outputs, expected):
            # Sums of 18 terms, then four normalisations of a few roundings each.
            bound = 2 * 4 * sum_error(18 + 8) * eager.abs().max().item()
            error = (torch.from_numpy(output) - eager).abs().max().item()
            assert error <= bound, f"ONNX Runtime's output off by {error:.3g}, {bound:.3g} allowed"


class Attend(nn.Module):
    """MultiheadAttention, cross-attention: [T, B, N, C] queries (or [B, T, N, C]), keys and
    values of other widths and S, a [B, N, S] padding mask; the output and the weights."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.attention = snn.MultiheadAttention(8, 2, kdim=5, vdim=3, add_bias_kv=True, batch_first=batch_first)
        self.eval()

    def forward(self, query, key, value, padding):
        return self.attention(query, key, value, key_padding_mask=padding)


class SelfAttend(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = snn.MultiheadAttention(8, 2)
        self.eval()

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def test_self_attention_keeps_t_and_b_dynamic_with_dynamo(tmp_path):
    """One tensor as query, key and value: the dynamo exporter keeps T and B dynamic (the
    TorchScript one fixes T there, for torch.nn's MultiheadAttention alike: docs/API.md)."""
    model, path = SelfAttend(), tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(T, B, 3, 8),), path,
                          dynamic_shapes=({0: torch.export.Dim("T"), 1: torch.export.Dim("B")},))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for t, b in [(T, B), (5, 2), (1, 1)]:
        x = torch.randn(t, b, 3, 8)
        output = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            eager = model(x)
        assert output.shape == eager.shape
        bound = 2 * 4 * sum_error(8) * (1 + eager.abs().max().item())  # as test_multihead_attention's
        assert (output - eager).abs().max().item() <= bound


@pytest.mark.parametrize("dynamo,batch_first", [(True, False), (True, True), (False, False), (False, True)],
                         ids=["dynamo-time-major", "dynamo-batch_first", "torchscript-time-major",
                              "torchscript-batch_first"])
def test_multihead_attention(dynamo, batch_first, tmp_path):
    model = Attend(batch_first)
    time, batch = (1, 0) if batch_first else (0, 1)

    def inputs(t, s, b, n=3):
        def sequence(steps, features):
            return torch.randn((b, steps, n, features) if batch_first else (steps, b, n, features))
        return sequence(t, 8), sequence(s, 5), sequence(s, 3), torch.rand(b, n, s) < 0.3

    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            t, s, b = torch.export.Dim("T"), torch.export.Dim("S"), torch.export.Dim("B")
            torch.onnx.export(model, inputs(T, 4, B), path, dynamic_shapes=(
                {time: t, batch: b}, {time: s, batch: b}, {time: s, batch: b}, {0: b, 2: s}))
        else:
            torch.onnx.export(model, inputs(T, 4, B), path, dynamo=False, input_names=["q", "k", "v", "p"],
                              dynamic_axes={"q": {time: "T", batch: "B"}, "k": {time: "S", batch: "B"},
                                            "v": {time: "S", batch: "B"}, "p": {0: "B", 2: "S"}})
    operators = assert_standard_operators(path)
    assert {"MatMul", "Softmax"} <= operators, operators
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for t, s, b in [(T, 4, B), (5, 2, 4)]:  # other T, S and B than the export's
        arguments = inputs(t, s, b)
        outputs = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), arguments)})
        with torch.no_grad():
            expected = model(*arguments)
        for name, output, eager in zip(["output", "weights"], outputs, expected):
            output = torch.from_numpy(output)
            assert output.shape == eager.shape, (name, output.shape, eager.shape)
            # Projections of 8 terms, scores of 4, softmax, sums over S + 1 values: a few sums of
            # at most 8 terms on values near 1, each erring by gamma_8 times the magnitudes.
            bound = 2 * 4 * sum_error(8) * (1 + eager.abs().max().item())
            error = (output - eager).abs().max().item()
            assert error <= bound, f"{name}: ONNX Runtime's output off by {error:.3g}, {bound:.3g} allowed"
