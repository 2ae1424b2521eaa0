"""The project's main job: spike trains [T, B, ...] through a multi-step SNN of matterhorn layers.

For a fully connected network and a convolutional one:
1. a training step is timed against the same network on folded torch.nn (what SpikingJelly does);
2. the multi-step network runs a whole spike train in one call per layer;
3. the same weights in single-step mode give the same result step by step (in eval: BatchNorm
   with running statistics);
4. it is exported with TorchScript and run by a C++ program (no Python), which prints the
   same numbers;
5. the exported network is served by matterhorn_serve (C++, HTTP on loopback) and queried.

    bash scripts/demo.sh          (or: .venv/bin/python demo/demo.py)
"""

import http.client
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.benchmark as benchmark

import matterhorn_pytorch as mth

T, B = 8, 32
OUT_DIR = Path(__file__).resolve().parent.parent / "demo_out"
RUN_MODEL = Path(mth._C.__file__).resolve().parent / "bin" / "matterhorn_run_model"
SERVE = Path(mth._C.__file__).resolve().parent / "bin" / "matterhorn_serve"


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
        # Heaviside forward, sigmoid-derivative (surrogate) backward, without a custom Function.
        surrogate = torch.sigmoid(4.0 * (u - self.threshold))
        spike = surrogate + ((u >= self.threshold).to(x.dtype) - surrogate).detach()
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


class Flatten(mth.snn.Module):
    """[T, B, C, H, W] -> [T, B, C*H*W] (single-step: [B, C, H, W] -> [B, C*H*W])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2) if self.step_mode == "m" else x.flatten(1)


def mlp():
    return nn.Sequential(mth.snn.Linear(784, 256), mth.snn.LayerNorm(256), LIF(), mth.snn.Linear(256, 10))


def convnet():
    return nn.Sequential(
        mth.snn.Conv2d(2, 8, 3, padding=1), mth.snn.BatchNorm2d(8), LIF(),
        mth.snn.Conv2d(8, 16, 3, stride=2, padding=1), mth.snn.BatchNorm2d(16), LIF(),
        Flatten(), mth.snn.Linear(16 * 16 * 16, 10),
    )


# name, network, input size per step
NETWORKS = [("mlp", mlp, (784,)), ("conv", convnet, (2, 32, 32))]


class Folded(nn.Module):
    """What SpikingJelly's multi-step layers do: a matterhorn layer's torch.nn twin (same
    parameters and buffers: it is the same object) on the folded [T*B, ...] tensor."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.twin = next(base for base in type(layer).__mro__ if base.__module__.startswith("torch.nn."))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.twin.forward(self.layer, x.flatten(0, 1)).unflatten(0, x.shape[:2])


def summary(output: torch.Tensor, who: str) -> str:
    """The line matterhorn_run_model prints, so the two can be compared by eye."""
    flat = output.double().flatten()
    first = ", ".join(f"{v:.6f}" for v in flat[:4].tolist())
    return f"matterhorn {mth.__version__} {who}: output {list(output.shape)} sum={flat.sum():.6f} first=[{first}]"


def time_training(net: nn.Module, size) -> str:
    """Forward+backward of the whole network in training: ours against the same network with every
    matterhorn layer replaced by its torch.nn twin on the folded tensor (the neurons are shared)."""
    fold = nn.Sequential(*[Folded(m) if isinstance(m, mth.snn.Synapse) else m for m in net])
    x = (torch.rand(T, B, *size) < 0.15).float().requires_grad_()

    def step(network):
        def run():
            network.zero_grad(set_to_none=True)
            network(x).sum().backward()
        return run

    net.train()
    times = {}
    for name, fn in [("ours", step(net)), ("fold", step(fold))]:
        fn()
        times[name] = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median
    net.eval()
    return (f"training step (fwd+bwd): ours {1e3 * times['ours']:.3f} ms, folded torch.nn {1e3 * times['fold']:.3f} ms, "
            f"ratio {times['ours'] / times['fold']:.3f}")


def run_network(name, make, size) -> bool:
    torch.manual_seed(0)
    net = make()
    spikes = (torch.rand(T, B, *size) < 0.15).float()  # rate-coded input, 15% density
    print(f"== {name}: {net.__class__.__name__} of {', '.join(type(m).__name__ for m in net)}")
    print("[1] " + time_training(net, size))  # also leaves BatchNorm with trained running statistics
    with torch.no_grad():
        multi = net(spikes)
        print(f"[2] multi-step (eval): {list(spikes.shape)} -> {list(multi.shape)}")
        for layer in net:  # a plain nn.Sequential holds no mode: switch each layer
            layer.single_step_mode_()
            layer.reset()
        steps = torch.stack([net(spikes[t]) for t in range(T)])
        for layer in net:
            layer.multi_step_mode_()
        difference = (steps - multi).abs().max().item()
        print(f"[3] single-step, step by step: max |difference| = {difference:.3g}")
        if difference > 1e-5:
            print("    MISMATCH between modes", file=sys.stderr)
            return False

    OUT_DIR.mkdir(exist_ok=True)
    model_path, input_path, output_path = (OUT_DIR / f"{name}.pt", OUT_DIR / f"{name}_input.pt",
                                           OUT_DIR / f"{name}_output.pt")
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
        return False
    difference = (torch.load(output_path) - multi).abs().max().item()
    print(f"    C++ vs Python: max |difference| = {difference:.3g}")
    return difference < 1e-4 and query_server(model_path, spikes, multi)


def query_server(model_path: Path, spikes: torch.Tensor, expected: torch.Tensor) -> bool:
    """Serve the exported model with matterhorn_serve and ask it for the same spike train."""
    server = subprocess.Popen([str(SERVE), str(model_path)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/infer", body=spikes.numpy().tobytes(),
                           headers={"X-Shape": ",".join(map(str, spikes.shape)), "X-Dtype": "float32"})
        response = connection.getresponse()
        answer = torch.frombuffer(bytearray(response.read()), dtype=torch.float32).view(expected.shape)
        difference = (answer - expected).abs().max().item()
        print(f"[5] matterhorn_serve on 127.0.0.1:{port}: HTTP {response.status}, output {list(answer.shape)}, "
              f"max |difference| vs Python = {difference:.3g}")
        return response.status == 200 and difference < 1e-4
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> int:
    ok = all([run_network(*network) for network in NETWORKS])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
