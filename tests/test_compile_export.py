"""torch.compile (no graph break) and torch.export with a dynamic T and B."""

import pytest
import torch
import torch.nn as nn

import matterhorn_pytorch as mth
from models import MixedConvNet, NormNet
from samples import sum_error


def network():
    return nn.Sequential(mth.snn.Linear(8, 16), nn.Tanh(), mth.snn.Linear(16, 4))


@pytest.mark.parametrize("make,shapes", [
    (network, [(4, 3, 8), (2, 5, 8)]),
    (MixedConvNet, [(3, 2, 2, 8, 8), (2, 3, 2, 8, 8)]),
    (NormNet, [(3, 4, 2, 6, 6), (2, 5, 2, 6, 6)]),
], ids=["linear", "all-six-convs", "norms"])
def test_compile_fullgraph_matches_eager_forward_and_backward(make, shapes):
    eager = make()
    compiled_net = make()
    compiled_net.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_net, fullgraph=True)
    for shape in shapes:  # two T, B: one graph with symbolic T and B
        x = torch.randn(shape)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(x, 1)
        x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_eager, y_compiled = eager(x_eager), compiled(x_compiled)
        torch.testing.assert_close(y_compiled, y_eager)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
        # gradients are float32 sums that inductor may order otherwise: n eps for the longest, a
        # conv weight's or a BatchNorm's over T*B*H*W positions, times the terms' scale, the
        # network's largest gradient (a bias before a BatchNorm sums to 0 from terms of that size)
        gradients = [x_eager.grad] + [p.grad for p in eager.parameters()]
        terms = sum_error(x[:, :, 0].numel())
        tolerance = dict(rtol=terms, atol=terms * max(g.abs().max() for g in gradients))
        torch.testing.assert_close(x_compiled.grad, x_eager.grad, **tolerance)
        for p_compiled, p_eager in zip(compiled_net.parameters(), eager.parameters()):
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, **tolerance)
        for b_compiled, b_eager in zip(compiled_net.buffers(), eager.buffers()):  # running statistics: sums too
            exact = not b_eager.is_floating_point()
            torch.testing.assert_close(b_compiled, b_eager, rtol=0 if exact else terms,
                                       atol=0 if exact else terms * b_eager.abs().max())
        eager.zero_grad(), compiled_net.zero_grad()


def test_export_with_dynamic_time_and_batch():
    model = network()
    T, B = torch.export.Dim("T", min=2), torch.export.Dim("B", min=2)
    exported = torch.export.export(model, (torch.randn(4, 3, 8),), dynamic_shapes=({0: T, 1: B},))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "matterhorn.linear.default" in targets
    for shape in [(4, 3, 8), (7, 2, 8)]:
        x = torch.randn(shape)
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_keeps_batch_norm_normalize_and_the_statistics_update(training):
    model = nn.Sequential(mth.snn.Conv2d(2, 3, 3, padding=1), mth.snn.BatchNorm2d(3)).train(training)
    reference = nn.BatchNorm2d(3)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5), model[1].bias.uniform_(-0.5, 0.5)
        model[1].running_mean.uniform_(-1, 1), model[1].running_var.uniform_(0.5, 2)
    reference.load_state_dict(model[1].state_dict())
    T, B = torch.export.Dim("T", min=2), torch.export.Dim("B", min=2)
    exported = torch.export.export(model, (torch.randn(3, 4, 2, 5, 5),), dynamic_shapes=({0: T, 1: B},))
    exported = exported.run_decompositions()  # what AOTInductor compiles
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    # the differentiable building block (its autograd node calls it again below autograd), and in
    # training the running statistics' update, functionalized
    assert "matterhorn.batch_norm_normalize.default" in targets, targets
    updates = [n for n in exported.graph.nodes if "batch_norm_update_stats" in str(n.args[:1])]
    assert bool(updates) == training, [str(n.args[:1]) for n in exported.graph.nodes if n.op == "call_function"]
    module = exported.module()
    for shape in [(3, 4, 2, 5, 5), (2, 5, 2, 5, 5)]:
        x = torch.randn(shape)
        with torch.no_grad():
            h = model[0](x)
            expected = reference.train(training)(h.flatten(0, 1)).unflatten(0, shape[:2])  # torch.nn, folded
            torch.testing.assert_close(module(x), expected)
    buffers = dict(module.named_buffers())
    for key in ("running_mean", "running_var"):  # updated twice in training, as torch.nn's
        torch.testing.assert_close(buffers[f"1.{key}"], getattr(reference, key), msg=lambda m: f"{key}: {m}")
