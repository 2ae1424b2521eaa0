"""torch.compile (no graph break) and torch.export with a dynamic T and B."""

import pytest
import torch
import torch.nn as nn

import matterhorn_pytorch as mth
from models import MixedConvNet, NormNet


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
        torch.testing.assert_close(x_compiled.grad, x_eager.grad)
        for p_compiled, p_eager in zip(compiled_net.parameters(), eager.parameters()):
            torch.testing.assert_close(p_compiled.grad, p_eager.grad)
        for b_compiled, b_eager in zip(compiled_net.buffers(), eager.buffers()):  # running statistics
            torch.testing.assert_close(b_compiled, b_eager)
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
