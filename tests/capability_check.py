"""The CPU kernels of one capability build against a float64 torch.nn reference: run as a script
by tests/test_cpu_capability.py, with ATEN_CPU_CAPABILITY set or under qemu-x86_64 (a CPU without
AVX2 or AVX-512). Prints the capability that ran, then "ok"; an assertion error or a signal
(SIGILL: an instruction the CPU lacks) fails the test.

Sizes are chosen so that every loop runs a vector body and a scalar tail at every vector width
(16, 32 and 64 bytes): 37 channels, 5 x 7 positions, rows of 70 and 3 values, 1470 spikes."""

import sys

import torch
import torch.nn as nn

import matterhorn_pytorch as mth

# Output rounding of the dtype plus float32 accumulation over at most a few thousand terms.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def close(actual, expected, dtype, what):
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance, atol=tolerance, msg=what)


def check_against_float64(layer, twin, x, fold, dtype, what):
    """Forward and input / parameter gradients of `layer` on x (dtype) against `twin` in float64."""
    twin = twin.double()
    twin.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in layer.state_dict().items()})
    layer.zero_grad(set_to_none=True)
    x = x.detach().to(dtype).clone().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y = layer(x)
    expected = twin(x64.flatten(0, 1)).unflatten(0, x.shape[:2]) if fold else twin(x64)
    close(y, expected, dtype, f"{what}: output")
    assert y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last) \
        or x.dim() != 4
    grad = torch.randn(y.shape).to(dtype).double()  # the same rounded values for both
    y.backward(grad.to(dtype))
    expected.backward(grad)
    close(x.grad, x64.grad, dtype, f"{what}: input gradient")
    for (name, p), (_, p64) in zip(layer.named_parameters(), twin.named_parameters()):
        close(p.grad, p64.grad, dtype if dtype == torch.float64 else torch.float32, f"{what}: {name} gradient")
    for (name, b), (_, b64) in zip(layer.named_buffers(), twin.named_buffers()):
        if b.is_floating_point():
            close(b, b64, torch.float32 if dtype != torch.float64 else dtype, f"{what}: {name}")


def check_spike_pack(dtype):
    """pack_spikes / unpack_spikes: 1470 values, whole 64-value words and a tail at every vector width."""
    x = (torch.rand(3, 70, 7) < 0.4).to(dtype)
    bits, _ = torch.ops.matterhorn.pack_spikes(x)
    ones = nn.functional.pad((x.flatten() == 1).long(), (0, -x.numel() % 8)).view(-1, 8)
    assert torch.equal(bits, (ones << torch.arange(8)).sum(1).to(torch.uint8)), f"pack_spikes {dtype}"
    assert torch.equal(torch.ops.matterhorn.unpack_spikes(bits, None, x.shape, x.stride(), dtype), x)
    x[1, 3, 2] = 0.5  # in a vector body
    try:
        torch.ops.matterhorn.pack_spikes(x)
    except ValueError:
        return
    raise AssertionError(f"pack_spikes {dtype} took 0.5 for a spike")


def main():
    torch.manual_seed(0)
    print(mth._C.cpu_capability(), flush=True)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for channels_last in (False, True):
            x = torch.randn(2, 3, 37, 5, 7) * 2 + 1
            layer = mth.snn.BatchNorm2d(37, dtype=param_dtype)
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-1, 1)
            if channels_last:  # the folded [T*B, C, H, W] tensor channels_last, seen as [T, B, ...]
                x = x.flatten(0, 1).to(memory_format=torch.channels_last).unflatten(0, (2, 3))
            check_against_float64(layer, nn.BatchNorm2d(37), x, True, dtype,
                                  f"BatchNorm2d {dtype} channels_last={channels_last}")
            layer.eval()
            check_against_float64(layer, nn.BatchNorm2d(37).eval(), x, True, dtype, f"BatchNorm2d eval {dtype}")
        check_against_float64(mth.snn.BatchNorm1d(37, dtype=param_dtype), nn.BatchNorm1d(37),
                              torch.randn(4, 5, 37), True, dtype, f"BatchNorm1d [T, B, C] {dtype}")
        for size in (70, 3):
            layer = mth.snn.LayerNorm(size, dtype=param_dtype)
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-1, 1)
            check_against_float64(layer, nn.LayerNorm(size), torch.randn(3, 4, 6, size) * 2 + 1, False, dtype,
                                  f"LayerNorm({size}) {dtype}")
        check_spike_pack(dtype)
    print("ok", flush=True)


if __name__ == "__main__":
    sys.exit(main())
