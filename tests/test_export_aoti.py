"""torch.export of a conv + batchnorm + linear network with a dynamic T and B, packaged by
AOTInductor to .pt2, loaded and run from C++ (AOTIModelPackageLoader) for two T and B values."""

import torch

from conftest import run_model_in_cpp
from models import ConvBNLinear


def test_pt2_with_dynamic_time_and_batch_runs_in_cpp(tmp_path):
    model = ConvBNLinear()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 2, 6, 6) * 2 + 1)
    model.eval()
    T, B = torch.export.Dim("T", min=2, max=64), torch.export.Dim("B", min=2, max=64)
    exported = torch.export.export(model, (torch.randn(4, 3, 2, 6, 6),), dynamic_shapes=({0: T, 1: B},))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"matterhorn.conv.default", "matterhorn.linear.default"} <= targets
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "model.pt2"))
    for steps, batch in ((3, 2), (9, 5)):
        x = torch.randn(steps, batch, 2, 6, 6)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(run_model_in_cpp(package, x, tmp_path), expected, rtol=1e-4, atol=1e-5)
