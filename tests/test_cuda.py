"""Every layer on CUDA against torch.nn on the folded tensor (skipped without a GPU; run by
scripts/gpu_check.sh). BatchNorm outputs are poisoned first, so an element a kernel never writes
fails the comparison."""

import os

import pytest
import torch
import torch.nn as nn

import matterhorn_pytorch as mth

# MATTERHORN_TEST_DEVICE=cpu runs this file on the CPU, which checks the tests themselves
# (tests/test_gpu_scripts.py does, so that GPU time is not spent fixing them).
DEVICE = os.environ.get("MATTERHORN_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (scripts/gpu_check.sh)")

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
             torch.float16: dict(rtol=1e-2, atol=1e-2)}


def fold(layer, x):
    return layer(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def compare(ours, reference, x, dtype, tolerance=None):
    tolerance = tolerance or TOLERANCE[dtype]
    x_ref = x.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), fold(reference, x_ref)
    torch.testing.assert_close(y.float(), y_ref.float(), **tolerance)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad.float(), x_ref.grad.float(), **tolerance)
    for (name, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), **tolerance, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,kwargs,shape", [
    ("Linear", dict(in_features=33, out_features=17), (3, 5, 33)),
    ("Conv2d", dict(in_channels=3, out_channels=8, kernel_size=3, padding=1), (3, 4, 3, 9, 11)),
    ("Conv1d", dict(in_channels=4, out_channels=6, kernel_size=4, padding="same", padding_mode="reflect", groups=2), (2, 3, 4, 13)),
    ("Conv3d", dict(in_channels=2, out_channels=4, kernel_size=(1, 3, 3), padding=(0, 1, 1)), (2, 2, 2, 3, 7, 7)),
    ("ConvTranspose2d", dict(in_channels=4, out_channels=2, kernel_size=3, stride=2, padding=1, output_padding=1), (2, 3, 4, 5, 6)),
    ("LayerNorm", dict(normalized_shape=(5, 6)), (3, 2, 4, 5, 6)),
])
def test_synapses_on_cuda(name, kwargs, shape, dtype):
    ours = getattr(mth.snn, name)(**kwargs, device=DEVICE, dtype=dtype)
    reference = getattr(nn, name)(**kwargs, device=DEVICE, dtype=dtype)
    reference.load_state_dict(ours.state_dict())
    compare(ours, reference, torch.randn(shape, device=DEVICE, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels,size,time_batch", [(1, (7, 5), (3, 2)), (3, (9, 11), (4, 3)), (300, (4, 4), (2, 3)),
                                                      (64, (32, 32), (1, 1))])
def test_batch_norm_2d_on_cuda(channels, size, time_batch, layout, dtype):
    ours = mth.snn.BatchNorm2d(channels, device=DEVICE)
    reference = nn.BatchNorm2d(channels, device=DEVICE)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    reference.load_state_dict(ours.state_dict())
    for _ in range(3):  # several steps: running statistics
        x = torch.randn(*time_batch, *size, channels, device=DEVICE, dtype=dtype).movedim(-1, 2)
        if layout == "contiguous":
            x = x.contiguous()
        compare(ours, reference, x, dtype)
        torch.testing.assert_close(ours.running_mean, reference.running_mean, **TOLERANCE[dtype])
        torch.testing.assert_close(ours.running_var, reference.running_var, **TOLERANCE[dtype])
    assert int(ours.num_batches_tracked) == 3
    ours.eval(), reference.eval()
    x = torch.randn(1, 1, channels, *size, device=DEVICE, dtype=dtype)  # T*B = 1 in eval
    torch.testing.assert_close(ours(x).float(), fold(reference, x).float(), **TOLERANCE[dtype])


def test_batch_norm_kernels_write_every_element():
    x = torch.randn(6, 5, 7, 3, device=DEVICE)
    mean, var = torch.ops.matterhorn.batch_norm_stats(x, 2)
    for _ in range(2):  # the caching allocator hands the poisoned block back to the op
        poison = torch.full_like(x, float("nan"))
        del poison
        y = torch.ops.matterhorn.batch_norm_elemt(x, mean, var, None, None, 1e-5, 2)
        assert torch.isfinite(y).all()
        sum_dy, sum_dy_xmu = torch.ops.matterhorn.batch_norm_backward_reduce(x, x, mean, 2)
        poison = torch.full_like(x, float("nan"))
        del poison
        dx = torch.ops.matterhorn.batch_norm_backward_elemt(x, x, mean, var, None, sum_dy, sum_dy_xmu, 1e-5, 3 * 7 * 3, 2)
        assert torch.isfinite(dx).all()


def test_per_step_batch_norm_on_cuda_equals_a_loop():
    ours = mth.snn.BatchNorm1d(4, per_step=True, device=DEVICE)
    reference = nn.BatchNorm1d(4, device=DEVICE)
    x = torch.randn(5, 3, 4, 6, device=DEVICE)
    torch.testing.assert_close(ours(x), torch.stack([reference(x[t]) for t in range(5)]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_var, reference.running_var, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_on_a_large_tensor(layout, dtype):
    """Many blocks per channel: rows and a row's vectors split over the grid, partial results merged."""
    ours = mth.snn.BatchNorm2d(32, device=DEVICE)
    reference = nn.BatchNorm2d(32, device=DEVICE)
    x = torch.randn(8, 16, 96, 96, 32, device=DEVICE, dtype=dtype).movedim(-1, 2) * 3 + 2
    if layout == "contiguous":
        x = x.contiguous()
    # sums over a million values in float32 on both sides: 1e-3
    compare(ours, reference, x, dtype, dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else None)
    torch.testing.assert_close(ours.running_var, reference.running_var, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_per_step_batch_norm_2d_on_cuda_equals_a_loop(layout):
    ours = mth.snn.BatchNorm2d(6, per_step=True, device=DEVICE)
    reference = nn.BatchNorm2d(6, device=DEVICE)
    x = torch.randn(4, 3, 9, 7, 6, device=DEVICE).movedim(-1, 2)
    if layout == "contiguous":
        x = x.contiguous()
    x_ref = x.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), torch.stack([reference(x_ref[t]) for t in range(4)])
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, reference.running_mean, rtol=1e-4, atol=1e-4)
    assert int(ours.num_batches_tracked) == 4 == int(reference.num_batches_tracked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name,kwargs,shape", [
    ("WSLinear", dict(in_features=33, out_features=17), (3, 5, 33)),
    ("WSConv2d", dict(in_channels=3, out_channels=8, kernel_size=3, padding=1, groups=1), (3, 4, 3, 9, 11)),
    ("WSConv1d", dict(in_channels=4, out_channels=6, kernel_size=4, padding="same", groups=2), (2, 3, 4, 13)),
])
def test_weight_standardized_layers_on_cuda(name, kwargs, shape, dtype, layout):
    """Against torch.nn's layer on the folded tensor with the weight standardised by torch ops in
    float32 (matterhorn 2.0.0's formula, mean and variance detached): output, input, weight,
    gamma and bias gradients."""
    ours = getattr(mth.snn, name)(**kwargs, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ours.gamma.uniform_(0.5, 1.5)
        ours.beta.uniform_(-0.5, 0.5)
    if layout == "channels_last" and ours.weight.dim() == 4:
        ours = ours.to(memory_format=torch.channels_last)  # the op keeps the weight's strides
        assert ours.standardized_weight().stride() == ours.weight.stride()
    twin = getattr(nn, name[2:])(**kwargs, device=DEVICE, dtype=dtype)
    twin.load_state_dict({k: v for k, v in ours.state_dict().items() if k in ("weight", "bias")})
    gamma = ours.gamma.detach().clone().requires_grad_()

    def reference(x):
        w = twin.weight
        per_channel = (-1,) + (1,) * (w.dim() - 1)
        var, mean = torch.var_mean(w.detach().float().flatten(1), dim=1)
        scale = gamma.float() / ((var * w[0].numel()).sqrt() + ours.eps)
        weight = (w.float() - mean.view(per_channel)) * scale.view(per_channel) + ours.beta.float().view(per_channel)
        return torch.func.functional_call(twin, {"weight": weight.to(dtype), "bias": twin.bias}, (x,))

    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = ours(x_ours), fold(reference, x_ref)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(y.float(), y_ref.float(), **tolerance)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    for what, a, b in [("input", x_ours.grad, x_ref.grad), ("weight", ours.weight.grad, twin.weight.grad),
                       ("gamma", ours.gamma.grad, gamma.grad), ("bias", ours.bias.grad, twin.bias.grad)]:
        scale = b.float().abs().max().item()  # gamma sums a channel's terms: relative to the largest
        torch.testing.assert_close(a.float(), b.float(), rtol=tolerance["rtol"], atol=tolerance["atol"] * max(1.0, scale),
                                   msg=lambda m: f"{what}: {m}")
