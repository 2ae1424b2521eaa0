"""The project's main job: spike trains [T, B, ...] through a multi-step SNN of matterhorn layers.

1. a multi-step network runs a whole spike train in one call per layer;
2. the same weights in single-step mode give the same result step by step;
3. the synapse layers are timed against folded torch.nn (what SpikingJelly does);
4. the network is exported with TorchScript and run by a C++ program (no Python), which prints
   the same numbers.

    bash scripts/demo.sh          (or: .venv/bin/python demo/demo.py)
"""

import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.benchmark as benchmark

import matterhorn_pytorch as mth

T, B, IN, HIDDEN, OUT = 8, 32, 784, 256, 10
OUT_DIR = Path(__file__).resolve().parent.parent / "demo_out"
RUN_MODEL = Path(mth._C.__file__).resolve().parent / "bin" / "matterhorn_run_model"


class LIF(mth.snn.Module):
    """A leaky integrate-and-fire neuron written in Python (neurons are not part of this library).
    Multi-step: loops over T inside one call. Single-step: keeps its potential between calls."""

    def __init__(self, tau: float = 2.0, threshold: float = 0.3) -> None:
        super().__init__()
        self.tau = tau
        self.threshold = threshold
        self.register_buffer("u", torch.zeros(0), persistent=False)

    def step(self, x: torch.Tensor, u: torch.Tensor):
        u = u + (x - u) / self.tau
        spike = (u >= self.threshold).to(x.dtype)
        return spike, u * (1.0 - spike)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "m":
            u = torch.zeros_like(x[0])
            spikes = []
            for t in range(x.shape[0]):
                spike, u = self.step(x[t], u)
                spikes.append(spike)
            return torch.stack(spikes)
        u = self.u if self.u.shape == x.shape else torch.zeros_like(x)
        spike, u = self.step(x, u)
        self.u = u
        return spike

    def reset(self) -> "LIF":
        self.u = torch.zeros(0)
        return self


def summary(output: torch.Tensor, who: str) -> str:
    """The line matterhorn_run_model prints, so the two can be compared by eye."""
    flat = output.double().flatten()
    first = ", ".join(f"{v:.6f}" for v in flat[:4].tolist())
    return f"matterhorn {mth.__version__} {who}: output {list(output.shape)} sum={flat.sum():.6f} first=[{first}]"


def time_synapses() -> None:
    """Forward+backward of the network's two synapse layers: ours vs torch.nn on the folded tensor."""
    ours = nn.Sequential(mth.snn.Linear(IN, HIDDEN), mth.snn.Linear(HIDDEN, OUT))
    fold = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT))
    fold.load_state_dict(ours.state_dict())
    x = (torch.rand(T, B, IN) < 0.15).float().requires_grad_()

    def step(net, fold_time):
        def run():
            net.zero_grad(set_to_none=True)
            y = net(x.flatten(0, 1)).unflatten(0, (T, B)) if fold_time else net(x)
            y.sum().backward()
        return run

    times = {}
    for name, fn in [("ours", step(ours, False)), ("fold", step(fold, True))]:
        fn()
        times[name] = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median
    print(f"[3] synapses fwd+bwd, T={T} B={B}: ours {1e3 * times['ours']:.3f} ms, "
          f"folded torch {1e3 * times['fold']:.3f} ms, ratio {times['ours'] / times['fold']:.3f}")


def main() -> int:
    torch.manual_seed(0)
    net = nn.Sequential(mth.snn.Linear(IN, HIDDEN), LIF(), mth.snn.Linear(HIDDEN, OUT)).eval()
    spikes = (torch.rand(T, B, IN) < 0.15).float()  # rate-coded input, 15% density

    with torch.no_grad():
        multi = net(spikes)
        print(f"[1] multi-step: {list(spikes.shape)} -> {list(multi.shape)}, "
              f"{int(net[1](net[0](spikes)).sum())} hidden spikes")

        for layer in net:  # a plain nn.Sequential holds no mode: switch each layer
            layer.single_step_mode_()
        net[1].reset()
        steps = torch.stack([net(spikes[t]) for t in range(T)])
        for layer in net:
            layer.multi_step_mode_()
        difference = (steps - multi).abs().max().item()
        print(f"[2] single-step, step by step: max |difference| = {difference:.3g}")
        if difference > 1e-5:
            print("    MISMATCH between modes", file=sys.stderr)
            return 1

    time_synapses()

    OUT_DIR.mkdir(exist_ok=True)
    model_path, input_path, output_path = OUT_DIR / "snn_demo.pt", OUT_DIR / "input.pt", OUT_DIR / "output.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates TorchScript; it still works
        torch.jit.script(net).save(str(model_path))
    torch.save(spikes, input_path)
    print(f"[4] TorchScript export: {model_path}")
    print("    " + summary(multi, "Python"))
    cpp = subprocess.run([str(RUN_MODEL), str(model_path), str(input_path), str(output_path)],
                         capture_output=True, text=True)
    print("    " + (cpp.stdout.strip() or cpp.stderr.strip()))
    if cpp.returncode != 0:
        return 1
    difference = (torch.load(output_path) - multi).abs().max().item()
    print(f"    C++ vs Python: max |difference| = {difference:.3g}")
    return 0 if difference < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
