"""GPU benchmark: SNN layers at typical sizes, ours against torch's fold in the same run on
the same card, forward+backward, CUDA events, median of 30 after warm-up. For the normalizations
the share of the memory floor (8 passes over the tensor for BatchNorm, 5 for LayerNorm) from a
device-copy bandwidth measured in the same run; each row says whether its goals are met (the
case's max_ratio of ours / fold, min_floor_share of the floor).
Before the table: our BatchNorm training step kernel by kernel (profiler), each pass's bandwidth.

    python bench/bench_gpu.py            (run by scripts/gpu_check.sh)
    python bench/bench_gpu.py --smoke    (tiny shapes on the CPU: checks the script itself)
"""

import argparse
import collections
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import matterhorn_pytorch as mth


@dataclass
class Case:
    label: str
    ours: Callable[[], nn.Module]
    twin: Callable[[], nn.Module]
    shape: Tuple[int, ...]  # [T, B, ...]
    channels_last: bool = False
    dtype: torch.dtype = torch.float32
    passes: int = 0  # memory floor: passes over the tensor (0: a synapse, no floor)
    max_ratio: Optional[float] = None  # goal: ours / fold at most this
    min_floor_share: Optional[float] = None  # goal: floor / ours at least this
    per_step: bool = False  # the reference is one torch.nn call per time step


def bn2d(channels, **kwargs):
    return lambda: mth.snn.BatchNorm2d(channels, **kwargs)


def nn_bn2d(channels):
    return lambda: nn.BatchNorm2d(channels)


SYNAPSE = dict(max_ratio=1.05)
BN = dict(passes=8, min_floor_share=0.8)
CASES = [
    Case("Conv2d 128->128 3x3, 32x32, T=4 B=64", lambda: mth.snn.Conv2d(128, 128, 3, padding=1), lambda: nn.Conv2d(128, 128, 3, padding=1), (4, 64, 128, 32, 32), **SYNAPSE),
    Case("Conv2d 256->256 3x3, 16x16, T=4 B=64", lambda: mth.snn.Conv2d(256, 256, 3, padding=1), lambda: nn.Conv2d(256, 256, 3, padding=1), (4, 64, 256, 16, 16), **SYNAPSE),
    Case("Conv2d 2->64 3x3, 128x128, T=16 B=16", lambda: mth.snn.Conv2d(2, 64, 3, padding=1), lambda: nn.Conv2d(2, 64, 3, padding=1), (16, 16, 2, 128, 128), **SYNAPSE),
    Case("Conv2d 64->64 3x3, 32x32, T=4 B=8", lambda: mth.snn.Conv2d(64, 64, 3, padding=1), lambda: nn.Conv2d(64, 64, 3, padding=1), (4, 8, 64, 32, 32), **SYNAPSE),
    Case("ConvTranspose2d 64->32 4x4 s2, 16x16, T=4 B=32", lambda: mth.snn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), lambda: nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), (4, 32, 64, 16, 16), **SYNAPSE),
    Case("Linear 384->1536, T=4, 64x64 tokens", lambda: mth.snn.Linear(384, 1536), lambda: nn.Linear(384, 1536), (4, 64, 64, 384), **SYNAPSE),
    Case("Linear 2048->10, T=4 B=64", lambda: mth.snn.Linear(2048, 10), lambda: nn.Linear(2048, 10), (4, 64, 2048), **SYNAPSE),
    Case("Conv1d 64->128 k3, L=700, T=8 B=64", lambda: mth.snn.Conv1d(64, 128, 3, padding=1), lambda: nn.Conv1d(64, 128, 3, padding=1), (8, 64, 64, 700), **SYNAPSE),
    Case("BatchNorm2d 128ch 32x32, T=4 B=64 (128 MiB)", bn2d(128), nn_bn2d(128), (4, 64, 128, 32, 32), max_ratio=1 / 2.5, **BN),
    Case("  same, channels_last", bn2d(128), nn_bn2d(128), (4, 64, 128, 32, 32), True, **BN),
    Case("  same, bf16", bn2d(128), nn_bn2d(128), (4, 64, 128, 32, 32), dtype=torch.bfloat16, **BN),
    Case("  same, bf16 channels_last", bn2d(128), nn_bn2d(128), (4, 64, 128, 32, 32), True, torch.bfloat16, **BN),
    Case("BatchNorm2d 64ch 128x128, T=16 B=16 (1 GiB)", bn2d(64), nn_bn2d(64), (16, 16, 64, 128, 128), max_ratio=1 / 3.5, **BN),
    Case("  same, channels_last", bn2d(64), nn_bn2d(64), (16, 16, 64, 128, 128), True, max_ratio=1.0, **BN),
    Case("  same, bf16", bn2d(64), nn_bn2d(64), (16, 16, 64, 128, 128), dtype=torch.bfloat16, max_ratio=1 / 9, **BN),
    Case("  same, bf16 channels_last", bn2d(64), nn_bn2d(64), (16, 16, 64, 128, 128), True, torch.bfloat16, max_ratio=1.0, **BN),
    Case("  same, per_step (vs a loop over T)", bn2d(64, per_step=True), nn_bn2d(64), (16, 16, 64, 128, 128), per_step=True, **BN),
    Case("LayerNorm(384), T=4 B=64 N=64", lambda: mth.snn.LayerNorm(384), lambda: nn.LayerNorm(384), (4, 64, 64, 384), passes=5),
    Case("LayerNorm(768), T=4 B=32 N=196", lambda: mth.snn.LayerNorm(768), lambda: nn.LayerNorm(768), (4, 32, 196, 768), passes=5),
]


def smoke_shape(shape, twin):
    """T = B = 2, the layer's own size kept, at most 8 per other side: every path of the script, in seconds."""
    if isinstance(twin, (nn.Linear, nn.LayerNorm)):  # features last
        return (2, 2, *(min(side, 8) for side in shape[2:-1]), shape[-1])
    return (2, 2, shape[2], *(min(side, 8) for side in shape[3:]))


def median_ms(fn, device, iterations, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def copy_bandwidth(device, numel, iterations, warmup):
    """Bytes read + written per second by a device copy."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, iterations, warmup)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def training_step(layer, forward, x, grad):
    def run():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        forward(x).backward(grad)
    return run


def fold(layer):
    return lambda t: layer(t.flatten(0, 1)).unflatten(0, t.shape[:2])


def loop_over_steps(layer):
    return lambda t: torch.stack([layer(t[step]) for step in range(t.shape[0])])


def goal_text(case, ratio, share):
    goals, met = [], True
    if case.max_ratio is not None:
        goals.append(f"ratio <= {case.max_ratio:.3g}")
        met = met and ratio <= case.max_ratio
    if case.min_floor_share is not None:
        goals.append(f"floor >= {case.min_floor_share:.0%}")
        met = met and share is not None and share >= case.min_floor_share
    return (", ".join(goals) + (": met" if met else ": MISSED")) if goals else ""


def case_input(case, twin, device, smoke):
    """The case's input: spikes at 15% density for synapses, normal values for
    normalizations; in the case's layout."""
    shape = smoke_shape(case.shape, twin) if smoke else case.shape
    x = torch.randn(shape, device=device, dtype=case.dtype) if case.passes else \
        (torch.rand(shape, device=device) < 0.15).to(case.dtype)
    if case.channels_last:  # [T, B, C, H, W] whose memory is [T, B, H, W, C]
        x = x.movedim(2, -1).contiguous().movedim(-1, 2)
    return x


def run_case(case, device, bandwidth, iterations, warmup, smoke):
    ours, twin = case.ours().to(device, case.dtype if case.passes == 0 else torch.float32), case.twin().to(device)
    if case.passes == 0:
        twin = twin.to(case.dtype)
    twin.load_state_dict(ours.state_dict())
    x = case_input(case, twin, device, smoke)
    x_ours, x_twin = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn_like(ours(x_ours)).detach()
    reference = loop_over_steps(twin) if case.per_step else fold(twin)
    ours_ms = median_ms(training_step(ours, ours, x_ours, grad), device, iterations, warmup)
    twin_ms = median_ms(training_step(twin, reference, x_twin, grad), device, iterations, warmup)
    share = twin_share = None
    if case.passes:
        floor_ms = case.passes * x.numel() * x.element_size() / bandwidth * 1e3
        share, twin_share = floor_ms / ours_ms, floor_ms / twin_ms
    ratio = ours_ms / twin_ms
    floor = f"{share:.0%} (torch {twin_share:.0%})" if share is not None else ""
    goal = "" if smoke else goal_text(case, ratio, share)
    return f"| {case.label} | {ours_ms:.3f} | {twin_ms:.3f} | {ratio:.3f} | {floor} | {goal} |"


# Tensor-sizes each BatchNorm kernel (or, on the CPU, op) moves: what it should take at copy speed.
PASSES = {"moments_kernel": 1, "elemt_kernel": 2, "sums_kernel": 2, "backward_elemt_kernel": 3,
          "matterhorn::batch_norm_stats": 1, "matterhorn::batch_norm_elemt": 2,
          "matterhorn::batch_norm_backward_reduce": 2, "matterhorn::batch_norm_backward_elemt": 3}


def short_name(name):
    """`void ns::moments_kernel<float, float, 4>(...)` -> `moments_kernel`; others as they are."""
    match = re.search(r"([A-Za-z_]\w*)\s*[<(]", name)
    return match.group(1) if match and "::" in name and not name.startswith("matterhorn::") else name


def kernel_breakdown(case, device, bandwidth, smoke, steps=10):
    """Where one of our training steps spends its time, kernel by kernel (ops on the CPU), and the
    bandwidth of each streaming pass against the copy's: tells which kernel to work on."""
    ours = case.ours().to(device)
    x = case_input(case, case.twin(), device, smoke).requires_grad_()
    grad = torch.randn_like(x)
    step = training_step(ours, ours, x, grad)
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    wanted = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
    totals = collections.defaultdict(float)
    for event in prof.events():
        name = short_name(event.name)
        if event.device_type == wanted and (device == "cuda" or name in PASSES):
            totals[name] += event.time_range.elapsed_us() / steps
    tensor_bytes = x.numel() * x.element_size()
    print(f"{case.label.strip()}: our training step, kernel by kernel ({'ops on the CPU' if smoke else 'CUDA'})")
    print("| kernel | us per step | TB/s | of copy |")
    print("|---|---|---|---|")
    for name, us in sorted(totals.items(), key=lambda item: -item[1]):
        rate = PASSES[name] * tensor_bytes / (us * 1e-6) if name in PASSES and us > 0 else None
        speed = f"| {rate / 1e12:.2f} | {rate / bandwidth:.0%} |" if rate else "| | |"
        print(f"| {name} | {us:.1f} {speed}")
    if device == "cuda":
        print(f"| all kernels | {sum(totals.values()):.1f} | | |")
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, two iterations")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    iterations, warmup = (2, 1) if args.smoke else (30, 5)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device, (1 << 20) if args.smoke else (256 << 20), iterations, warmup)
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run)"
    print(f"{card}, torch {torch.__version__}, copy {bandwidth / 1e12:.2f} TB/s, {time.strftime('%Y-%m-%d')}")
    for case in CASES:  # first, so that the table comes last
        if case.passes == 8 and not case.per_step and case.dtype == torch.float32 and not case.channels_last:
            try:  # a diagnosis: the table below must come even if the profiler misbehaves
                kernel_breakdown(case, device, bandwidth, args.smoke)
            except Exception as error:  # noqa: BLE001
                print(f"kernel breakdown of {case.label.strip()} failed: {error!r}\n")
    print("| case (fwd+bwd) | ours (ms) | torch (ms) | ours / torch | share of floor | goal |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        print(run_case(case, device, bandwidth, iterations, warmup, args.smoke))
        sys.stdout.flush()
    if device == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
