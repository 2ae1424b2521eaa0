"""GPU benchmark: the cases of ../shared/ANCHORS.md, ours against torch's fold in the same run on
the same card, forward+backward, CUDA events, median of 30 after warm-up; for BatchNorm the share
of the 8-pass memory floor, from a device-copy bandwidth measured in the same run.

    python bench/bench_gpu.py          (run by scripts/gpu_check.sh)
"""

import statistics
import sys

import torch
import torch.nn as nn

import matterhorn_pytorch as mth

# (label, ours, twin, input shape [T, B, ...], channels_last, dtype)
CASES = [
    ("Conv2d 128->128 3x3, 32x32, T=4 B=64", lambda: mth.snn.Conv2d(128, 128, 3, padding=1), lambda: nn.Conv2d(128, 128, 3, padding=1), (4, 64, 128, 32, 32), False, torch.float32),
    ("Conv2d 256->256 3x3, 16x16, T=4 B=64", lambda: mth.snn.Conv2d(256, 256, 3, padding=1), lambda: nn.Conv2d(256, 256, 3, padding=1), (4, 64, 256, 16, 16), False, torch.float32),
    ("Conv2d 2->64 3x3, 128x128, T=16 B=16", lambda: mth.snn.Conv2d(2, 64, 3, padding=1), lambda: nn.Conv2d(2, 64, 3, padding=1), (16, 16, 2, 128, 128), False, torch.float32),
    ("Conv2d 64->64 3x3, 32x32, T=4 B=8", lambda: mth.snn.Conv2d(64, 64, 3, padding=1), lambda: nn.Conv2d(64, 64, 3, padding=1), (4, 8, 64, 32, 32), False, torch.float32),
    ("Linear 384->1536, T=4, 64x64 tokens", lambda: mth.snn.Linear(384, 1536), lambda: nn.Linear(384, 1536), (4, 64, 64, 384), False, torch.float32),
    ("Linear 2048->10, T=4 B=64", lambda: mth.snn.Linear(2048, 10), lambda: nn.Linear(2048, 10), (4, 64, 2048), False, torch.float32),
    ("Conv1d 64->128 k3, L=700, T=8 B=64", lambda: mth.snn.Conv1d(64, 128, 3, padding=1), lambda: nn.Conv1d(64, 128, 3, padding=1), (8, 64, 64, 700), False, torch.float32),
    ("BatchNorm2d 128ch 32x32, T=4 B=64 (128 MiB)", lambda: mth.snn.BatchNorm2d(128), lambda: nn.BatchNorm2d(128), (4, 64, 128, 32, 32), False, torch.float32),
    ("  same, channels_last", lambda: mth.snn.BatchNorm2d(128), lambda: nn.BatchNorm2d(128), (4, 64, 128, 32, 32), True, torch.float32),
    ("BatchNorm2d 64ch 128x128, T=16 B=16 (1 GiB)", lambda: mth.snn.BatchNorm2d(64), lambda: nn.BatchNorm2d(64), (16, 16, 64, 128, 128), False, torch.float32),
    ("  same, channels_last", lambda: mth.snn.BatchNorm2d(64), lambda: nn.BatchNorm2d(64), (16, 16, 64, 128, 128), True, torch.float32),
    ("  same, bf16 input", lambda: mth.snn.BatchNorm2d(64), lambda: nn.BatchNorm2d(64), (16, 16, 64, 128, 128), False, torch.bfloat16),
    ("LayerNorm(768), T=4 B=32 N=196", lambda: mth.snn.LayerNorm(768), lambda: nn.LayerNorm(768), (4, 32, 196, 768), False, torch.float32),
]


def cuda_median_ms(fn, iterations=30, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth():
    """Bytes read + written per second by a device copy of 1 GiB."""
    src = torch.randn(256 << 20, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def step(layer, forward, x, grad):
    def run():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        forward(x).backward(grad)
    return run


def main():
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy {bandwidth / 1e12:.2f} TB/s")
    print("| case | ours (ms) | fold (ms) | ours / fold | share of floor |")
    print("|---|---|---|---|---|")
    for label, make_ours, make_fold, shape, channels_last, dtype in CASES:
        ours, fold = make_ours().cuda(), make_fold().cuda()
        fold.load_state_dict(ours.state_dict())
        normalization = "Norm" in label or label.startswith("  same")
        # synapses get spikes at 15% density (as in ANCHORS.md), normalizations normal values
        x = torch.randn(shape, device="cuda", dtype=dtype) if normalization else \
            (torch.rand(shape, device="cuda") < 0.15).to(dtype)
        if channels_last:
            x = x.movedim(2, -1).contiguous().movedim(-1, 2)
        x_ours, x_fold = x.clone().requires_grad_(), x.clone().requires_grad_()
        grad = torch.randn_like(ours(x_ours)).detach()
        ours_ms = cuda_median_ms(step(ours, ours, x_ours, grad))
        fold_ms = cuda_median_ms(step(fold, lambda t: fold(t.flatten(0, 1)).unflatten(0, t.shape[:2]), x_fold, grad))
        floor = ""
        if "BatchNorm" in label or label.startswith("  same"):  # 8 passes over the tensor
            floor_ms = 8 * x.numel() * x.element_size() / bandwidth * 1e3
            floor = f"{floor_ms / ours_ms:.0%} (fold {floor_ms / fold_ms:.0%})"
        print(f"| {label} | {ours_ms:.3f} | {fold_ms:.3f} | {ours_ms / fold_ms:.3f} | {floor} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
