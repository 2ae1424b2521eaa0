"""Training memory of a conv SNN: bytes kept for backward and peak memory, with and without spike_input.

The network: 3 x (Conv2d - BatchNorm2d - spike) + Linear on [T, B, 2, 32, 32] event-camera-like
input spikes (T = 4, 8, 16). The spikes come from a real threshold: a Heaviside forward with an
arctan surrogate backward (written here), which keeps its membrane input for backward as any
surrogate does. Three builds of the same network, with the same weights, in the same run:

- fold: torch.nn on the folded [T*B, ...] tensor (SpikingJelly's multi-step layers);
- ours: mth.snn layers, dense (spike_input=False);
- ours + spike_input: mth.snn layers whose synapses keep their input spikes as bits.

Measured per build and T:

- kept: the bytes of the activations saved for backward during the forward (saved-tensor hooks,
  each storage once, parameters left out);
- peak: the process's resident memory at its highest during one training step (forward and
  backward), above what it held before the step; each configuration runs in its own child process
  (Linux VmHWM, reset through /proc/self/clear_refs), with glibc's mmap threshold fixed so that
  freed tensors go back to the system;
- step: the median time of a training step (forward, loss, backward), in this process, the builds
  timed in alternating rounds (each round in another order); and the median CPU time of single
  steps, alternating (``time.process_time``: the time this process ran, which other processes on a
  shared machine change less than the wall time).

    .venv/bin/python bench/bench_memory.py [--quick]

``--quick`` is a smoke run: T = 2, B = 1, one thread, one short round (its numbers say nothing).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import matterhorn_pytorch as mth  # noqa: E402
from common import machine, median_seconds  # noqa: E402

BUILDS = ["fold", "ours", "ours + spike_input"]
# (in, out, stride) of the three convolutions: the activations keep their size through the network, so that
# the peak is reached where the saved activations are most, at the start of backward (a network whose first
# layer is its largest peaks in that layer's backward, where spike_input saves nothing: its input is the data)
CHANNELS = [(2, 32, 1), (32, 32, 1), (32, 32, 1)]
SIZE = 32  # input height and width
CLASSES = 10


class Heaviside(torch.autograd.Function):
    """Spikes where the membrane input reaches 1; the gradient of an arctan surrogate."""

    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return (v >= 1).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad / (v - 1).mul_(math.pi).square_().add_(1)  # one temporary


class Spike(nn.Module):
    def forward(self, v):
        return Heaviside.apply(v)


def network(build):
    """The network of `build`, input [T, B, 2, SIZE, SIZE] -> [T, B, CLASSES]."""
    layers = []
    spatial = SIZE
    if build == "fold":
        for c_in, c_out, stride in CHANNELS:
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), Spike()]
            spatial //= stride
        body = nn.Sequential(*layers, nn.Flatten(1), nn.Linear(CHANNELS[-1][1] * spatial * spatial, CLASSES))
        return lambda x: body(x.flatten(0, 1)).unflatten(0, x.shape[:2]), body
    spike_input = build == "ours + spike_input"
    for c_in, c_out, stride in CHANNELS:
        layers += [mth.snn.Conv2d(c_in, c_out, 3, stride, 1, bias=False, spike_input=spike_input),
                   mth.snn.BatchNorm2d(c_out), Spike()]
        spatial //= stride
    body = nn.Sequential(*layers, nn.Flatten(2),
                         mth.snn.Linear(CHANNELS[-1][1] * spatial * spatial, CLASSES, spike_input=spike_input))
    return body, body


def setup(build, T, B, seed=0):
    """(forward, module, input spikes, targets) with weights and data that depend on the seed only."""
    torch.manual_seed(seed)
    forward, module = network(build)
    torch.manual_seed(seed + 1)
    for p in module.parameters():  # the same weights in every build (the same shapes, in the same order)
        with torch.no_grad():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 0.1) + (1 if p.dim() == 1 else 0))
    intensity = torch.rand(1, B, 2, SIZE, SIZE)
    x = (torch.rand(T, B, 2, SIZE, SIZE) < intensity).float()  # rate-coded input spikes
    target = torch.randint(CLASSES, (B,))
    return forward, module, x, target


def training_step(forward, module, x, target):
    def step():
        module.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(forward(x).mean(0), target)
        loss.backward()
    return step


def kept_bytes(forward, module, x, target):
    """Bytes of the activations the forward saves for backward (each storage once, no parameters)."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(t):
        address = t.untyped_storage().data_ptr()
        if address not in parameters:
            storages[address] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(forward(x).mean(0), target)
    loss.backward()
    return sum(storages.values())


def rss(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(build, T, B):
    """Peak resident bytes above the start of one training step (run in a process of its own)."""
    forward, module, x, target = setup(build, T, B)
    step = training_step(forward, module, x, target)
    step()  # warm-up: oneDNN's primitives and workspace, the autograd engine's threads
    module.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    before = rss("VmRSS")
    step()
    print(json.dumps({"peak": rss("VmHWM") - before}))


def peak_bytes(build, T, B, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, __file__, "--child", build, str(T), str(B)], env=env,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a smoke run: T=2, B=1, one thread, one short round")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        build, T, B = args.child
        return child(build, int(T), int(B))
    if args.quick:
        torch.set_num_threads(1)
    steps, B = ([2], 1) if args.quick else ([4, 8, 16], 8)
    rounds, min_run_time = (1, 0.05) if args.quick else (5, 1.0)
    print(f"\nConv SNN training step, 3 x (Conv2d-BatchNorm2d-spike) + Linear, input [T, {B}, 2, {SIZE}, {SIZE}]  "
          f"({machine()})")
    print("| T | kept for backward, MB: fold / ours / ours + spike_input | reduction vs fold | "
          "peak, MB: fold / ours / ours + spike_input | reduction vs fold | "
          "step, ms: fold / ours / ours + spike_input | spike_input / ours | step CPU time: spike_input / ours |")
    print("|---|---|---|---|---|---|---|---|")
    for T in steps:
        configs = {build: setup(build, T, B) for build in BUILDS}
        kept = {build: kept_bytes(*configs[build]) for build in BUILDS}
        peak = {build: peak_bytes(build, T, B, torch.get_num_threads()) for build in BUILDS}
        step = {build: training_step(*configs[build]) for build in BUILDS}
        for build in BUILDS:  # warm-up
            step[build]()
        times = {build: [] for build in BUILDS}
        for r in range(rounds):  # alternating, in a rotating order, so that drift and order hit every build
            for build in BUILDS[r % 3:] + BUILDS[:r % 3]:
                times[build].append(median_seconds(step[build], min_run_time))
        ms = {build: 1e3 * statistics.median(times[build]) for build in BUILDS}
        cpu = {build: [] for build in BUILDS}
        for r in range(3 if args.quick else 15):
            for build in BUILDS[r % 3:] + BUILDS[:r % 3]:
                start = time.process_time()
                step[build]()
                cpu[build].append(time.process_time() - start)
        cpu_ratio = statistics.median(cpu[BUILDS[2]]) / statistics.median(cpu["ours"])
        mb = lambda values: " / ".join(f"{values[b] / 2**20:.1f}" for b in BUILDS)  # noqa: E731
        print(f"| {T} | {mb(kept)} | {kept['fold'] / kept[BUILDS[2]]:.2f}x | {mb(peak)} | "
              f"{peak['fold'] / peak[BUILDS[2]]:.2f}x | {' / '.join(f'{ms[b]:.1f}' for b in BUILDS)} | "
              f"{ms[BUILDS[2]] / ms['ours']:.3f} | {cpu_ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
