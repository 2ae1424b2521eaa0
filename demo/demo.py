"""The project's main job, end to end: a spiking conv net of matterhorn layers learns to read
handwritten digits, then runs without Python.

1. Data: scikit-learn's 1797 handwritten digits (8x8 scans, shipped inside the package), a fixed
   stratified split into train and held-out images; each image becomes a Poisson spike train of
   T steps ([T, B, 1, 8, 8]; a pixel's intensity is its spike probability per step).
2. Network: two Conv2d-BatchNorm2d-LIF blocks and a Linear readout whose output, averaged over
   T, gives the class scores. The synapse layers take the whole spike train in one call; the LIF
   neuron (written here: the library has synapses only) loops over T and learns through a
   surrogate gradient. Trained with Adam on one CPU thread (see --threads), seeded: a second run
   prints the same numbers. A progress bar per epoch; the held-out accuracy is printed as
   `test accuracy: 0.xxxx` (0.9733 with the defaults).
3. Figures in demo_out/: loss and accuracy per epoch, a spike raster of one held-out digit
   through the layers, the firing rate per layer.
4. Speed: one training epoch of this network against the same network (same weights, same
   batches) built from torch.nn layers applied to the folded [T*B, ...] tensor.
5. Deployment: TorchScript (.pt) and AOTInductor (.pt2) exports, both run from C++ by
   matterhorn_run_model on the held-out spike trains (outputs compared with Python's), and the
   .pt2 served by matterhorn_serve over HTTP: its class for a held-out digit is Python's. The
   AOTInductor compile is the longest part (about 20 s of a 40 s run on 2 busy cores).

    bash scripts/demo.sh          (or: .venv/bin/python demo/demo.py)
    .venv/bin/python demo/demo.py --epochs 1 --limit 64     (a quick run of every part)
"""

import argparse
import copy
import http.client
import random
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import matterhorn_pytorch as mth

BIN = Path(mth._C.__file__).resolve().parent / "bin"
RUN_MODEL, SERVE = BIN / "matterhorn_run_model", BIN / "matterhorn_serve"


class LIF(nn.Module):
    """Leaky integrate-and-fire neurons over [T, B, ...]: u <- u + (x - u) / tau, a spike where
    u reaches the threshold, then u back to 0. Forward is the Heaviside step; in training,
    backward uses the derivative of a steep sigmoid instead (a surrogate gradient), by the
    straight-through trick: plain tensor arithmetic, which TorchScript and torch.export take."""

    def __init__(self, tau: float = 2.0, threshold: float = 1.0, slope: float = 4.0) -> None:
        super().__init__()
        self.tau, self.threshold, self.slope = tau, threshold, slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.zeros_like(x[0])
        spikes = []
        for t in range(x.shape[0]):
            u = u + (x[t] - u) / self.tau
            spike = (u >= self.threshold).to(x.dtype)
            if self.training:  # the same value (up to rounding), with the sigmoid's gradient
                surrogate = torch.sigmoid(self.slope * (u - self.threshold))
                spike = surrogate + (spike - surrogate).detach()
            u = u * (1.0 - spike)
            spikes.append(spike)
        return torch.stack(spikes)


class Flatten(nn.Module):
    """[T, B, C, H, W] -> [T, B, C*H*W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2)


class DigitsSNN(nn.Module):
    """[T, B, 1, 8, 8] spikes -> [B, 10] class scores (the readout's potential averaged over T).
    `layers` supplies Conv2d, BatchNorm2d and Linear: mth.snn, or the folded torch.nn below."""

    def __init__(self, layers=mth.snn, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            layers.Conv2d(1, c, 3, padding=1, bias=False), layers.BatchNorm2d(c), LIF(),                  # 8x8
            layers.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), layers.BatchNorm2d(2 * c), LIF(),  # 4x4
            Flatten(), layers.Linear(2 * c * 4 * 4, 10),
        )

    def forward(self, spikes: torch.Tensor) -> torch.Tensor:
        return self.features(spikes).mean(0)


class Folded:
    """A torch.nn layer made multi-step by folding T into the batch: [T, B, ...] -> [T*B, ...],
    the layer, then back. Mixed into torch.nn's own classes so that state_dicts match ours."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(0, 1)).unflatten(0, x.shape[:2])


FOLDED = types.SimpleNamespace(
    Conv2d=type("Conv2d", (Folded, nn.Conv2d), {}),
    BatchNorm2d=type("BatchNorm2d", (Folded, nn.BatchNorm2d), {}),
    Linear=type("Linear", (Folded, nn.Linear), {}),
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(limit: int, seed: int):
    """Images in [0, 1] as [N, 1, 8, 8] and labels, split 75 / 25 with every class in both parts."""
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=digits.target, random_state=seed)
    if limit:
        train, test = train[:limit], test[:limit]
    return images[train], labels[train], images[test], labels[test]


def encode(images: torch.Tensor, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Poisson rate code: [B, ...] intensities in [0, 1] -> [T, B, ...] spikes."""
    return torch.bernoulli(images.expand(steps, *images.shape), generator=generator)


def batches(images, labels, steps: int, batch: int, seed: int):
    """The training images in a seeded order as seeded spike trains: (spikes, labels) per batch."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(order), batch):
        index = order[start:start + batch]
        yield encode(images[index], steps, generator), labels[index]


def train_step(net, optimizer, spikes, labels):
    """Forward, backward, optimizer step; returns (summed loss, correct answers) of the batch."""
    scores = net(spikes)
    loss = F.cross_entropy(scores, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item() * len(labels), (scores.argmax(1) == labels).sum().item()


def run_epoch(net, images, labels, optimizer, steps: int, batch: int, seed: int, desc: str):
    """One pass over the training images with a progress bar. Returns (mean loss, accuracy)."""
    net.train()
    total_loss, correct = 0.0, 0
    count = (len(labels) + batch - 1) // batch
    for spikes, target in tqdm(batches(images, labels, steps, batch, seed), desc=desc, total=count, leave=False,
                               dynamic_ncols=True):
        loss, right = train_step(net, optimizer, spikes, target)
        total_loss, correct = total_loss + loss, correct + right
    return total_loss / len(labels), correct / len(labels)


@torch.no_grad()
def evaluate(net, spikes: torch.Tensor, labels: torch.Tensor):
    net.eval()
    scores = net(spikes)
    return F.cross_entropy(scores, labels).item(), (scores.argmax(1) == labels).float().mean().item(), scores


@torch.no_grad()
def layer_spikes(net: DigitsSNN, spikes: torch.Tensor):
    """The input spike train and each LIF layer's output: [(name, [T, B, ...])]."""
    net.eval()
    trains, x, block = [("input", spikes)], spikes, 0
    for layer in net.features:
        x = layer(x)
        if isinstance(layer, LIF):
            block += 1
            trains.append((f"block {block} LIF", x))
    return trains


def plot_history(history, path: Path) -> None:
    epochs = range(1, len(history) + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    left.plot(epochs, [h["test_loss"] for h in history], "o-", label="held-out")
    left.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    right.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    right.plot(epochs, [h["test_acc"] for h in history], "o-", label="held-out")
    right.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for axis in (left, right):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_raster(image, trains, scores, label: int, path: Path) -> None:
    """One digit: its image, then for each layer a dot per (time step, neuron) that spiked."""
    figure, axes = plt.subplots(1, len(trains) + 2, figsize=(4 * (len(trains) + 2), 4))
    axes[0].imshow(image.squeeze(), cmap="gray_r")
    axes[0].set(title=f"held-out digit (label {label})", xticks=[], yticks=[])
    for axis, (name, train) in zip(axes[1:], trains):
        train = train[:, 0].flatten(1)  # [T, neurons] of the one digit
        steps, neurons = torch.nonzero(train, as_tuple=True)
        axis.scatter(steps, neurons, marker="s", s=max(1.0, 600 / train.shape[1]), linewidths=0, color="black")
        axis.set(title=f"{name}: {train.shape[1]} neurons", xlabel="time step", ylabel="neuron",
                 xlim=(-0.5, train.shape[0] - 0.5), ylim=(-1, train.shape[1]))
    axes[-1].bar(range(10), scores.softmax(0).tolist())
    axes[-1].set(title=f"readout: class {scores.argmax().item()}", xlabel="class", ylabel="softmax of scores",
                 xticks=range(10))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_rates(rates, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 4))
    names = list(rates)
    axis.bar(names, [rates[name] for name in names])
    for i, name in enumerate(names):
        axis.text(i, rates[name], f"{rates[name]:.3f}", ha="center", va="bottom")
    axis.set(ylabel="spikes per neuron per time step", title="Firing rate per layer (held-out set)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def time_epochs(net, images, labels, args) -> None:
    """A training epoch of copies of the trained network: ours, and the same weights in folded
    torch.nn layers. Both take the same batches, one after the other batch by batch (taking turns
    to go first), so that both see the same load of a shared machine. The epoch is run
    `timing_rounds` times; a network's epoch time is the sum over batches of its fastest step
    (spike encoding excluded), which filters out the moments the machine was busy elsewhere."""
    ours = copy.deepcopy(net)
    fold = DigitsSNN(FOLDED, args.channels)
    fold.load_state_dict(net.state_dict())
    networks = {"ours": ours, "fold": fold}
    # lr 0: the optimizer step runs and the weights stay, so both networks stay the same.
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.0) for name, model in networks.items()}
    fastest = {name: {} for name in networks}  # batch -> seconds
    for model in networks.values():
        model.train()
    for _ in range(args.timing_rounds):
        losses = dict.fromkeys(networks, 0.0)
        for i, (spikes, target) in enumerate(batches(images, labels, args.steps, args.batch, args.seed + 1000)):
            for name in ("ours", "fold") if i % 2 == 0 else ("fold", "ours"):
                start = time.perf_counter()
                loss, _ = train_step(networks[name], optimizers[name], spikes, target)
                seconds = time.perf_counter() - start
                fastest[name][i] = min(fastest[name].get(i, seconds), seconds)
                losses[name] += loss / len(labels)
    ours_s, fold_s = sum(fastest["ours"].values()), sum(fastest["fold"].values())
    print(f"epoch time ({len(labels)} images, T={args.steps}, batch {args.batch}, forward + backward + step): "
          f"matterhorn {ours_s:.3f} s, folded torch.nn {fold_s:.3f} s, ratio {ours_s / fold_s:.3f} "
          f"(loss {losses['ours']:.6f} vs {losses['fold']:.6f})")


def export(net: DigitsSNN, example: torch.Tensor, out: Path, aoti: bool):
    """TorchScript and (if asked) AOTInductor exports of the eval network. TorchScript keeps the
    neuron's loop, so T and B stay free; torch.export unrolls it, so the .pt2 has the example's T
    and a free B."""
    net.eval()
    paths = {"TorchScript": out / "digits.pt"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates TorchScript; it still works
        torch.jit.script(net).save(str(paths["TorchScript"]))
    print(f"TorchScript: {paths['TorchScript']}")
    if aoti:
        start = time.perf_counter()
        batch = torch.export.Dim("B", min=1, max=4096)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.13's export warns about its own pytree use
            exported = torch.export.export(net, (example,), dynamic_shapes=({1: batch},))
            paths["AOTInductor"] = Path(torch._inductor.aoti_compile_and_package(
                exported, package_path=str(out / "digits.pt2")))
        print(f"AOTInductor: {paths['AOTInductor']} (export + compile {time.perf_counter() - start:.1f} s)")
    return paths


def run_in_cpp(model: Path, spikes: torch.Tensor, expected: torch.Tensor, labels: torch.Tensor, out: Path) -> bool:
    """matterhorn_run_model (C++, no Python) on the held-out spike trains, against Python's scores."""
    input_path, output_path = out / "heldout_spikes.pt", out / f"{model.name}.output.pt"
    torch.save(spikes, input_path)
    result = subprocess.run([str(RUN_MODEL), str(model), str(input_path), str(output_path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        print(f"  C++ {model.name}: failed: {result.stderr.strip()}")
        return False
    scores = torch.load(output_path)
    difference = (scores - expected).abs().max().item()
    same = (scores.argmax(1) == expected.argmax(1)).all().item()
    accuracy = (scores.argmax(1) == labels).float().mean().item()
    print(f"  C++ {model.name}: scores {list(scores.shape)}, max |C++ - Python| = {difference:.3g}, "
          f"classes {'equal' if same else 'DIFFER'} (C++ accuracy {accuracy:.4f})")
    return difference < 1e-4 and same


def serve(model: Path, digit: torch.Tensor, expected: int) -> bool:
    """Start matterhorn_serve on the model, POST one held-out digit's spike train, read its class."""
    server = subprocess.Popen([str(SERVE), str(model)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("listening on "):
            print(f"  matterhorn_serve: did not start: {line.strip()} {server.stderr.read().strip()}")
            return False
        host, port = line.split()[-1].rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request("POST", "/infer", body=digit.contiguous().numpy().tobytes(),
                           headers={"X-Shape": ",".join(map(str, digit.shape)), "X-Dtype": "float32"})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            print(f"  matterhorn_serve: HTTP {response.status}: {body.decode(errors='replace').strip()}")
            return False
        shape = [int(size) for size in response.getheader("X-Shape").split(",")]
        scores = torch.frombuffer(bytearray(body), dtype=torch.float32).view(shape)
        predicted = scores.argmax(1).item()
        print(f"  matterhorn_serve {model.name} on {host}:{port}: POST /infer {list(digit.shape)} -> HTTP 200, "
              f"scores {shape}, server class {predicted}, Python class {expected}")
        return predicted == expected
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--limit", type=int, default=0, help="use at most this many train and held-out images (0: all)")
    parser.add_argument("--steps", type=int, default=8, help="time steps T of the spike trains")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32, help="channels of the first conv block")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--timing-rounds", type=int, default=3,
                        help="timed epochs per network; the fastest step per batch counts (0: no timing)")
    parser.add_argument("--no-aoti", action="store_true", help="skip the .pt2 export (its compile takes the longest)")
    # One thread by default: a batch here is small (an op takes tens of microseconds), so a
    # second thread's synchronisation costs more than it saves, and on a busy machine every op
    # waits for the slowest thread. A fixed count also keeps the float sums, so the run, the same.
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "demo_out")
    args = parser.parse_args()
    begin = time.perf_counter()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    train_x, train_y, test_x, test_y = load_data(args.limit, args.seed)
    test_spikes = encode(test_x, args.steps, torch.Generator().manual_seed(args.seed + 1))  # one fixed code
    print(f"digits: {len(train_y)} train, {len(test_y)} held-out 8x8 images -> Poisson spike trains "
          f"[T={args.steps}, B, 1, 8, 8]; torch {torch.__version__}, matterhorn {mth.__version__}, "
          f"{torch.get_num_threads()} CPU thread(s)")

    net = DigitsSNN(mth.snn, args.channels)
    print("network: " + " -> ".join(type(layer).__name__ for layer in net.features) + " -> mean over T")
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1))
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        train_loss, train_acc = run_epoch(net, train_x, train_y, optimizer, args.steps, args.batch,
                                          args.seed + epoch, desc=f"epoch {epoch + 1}/{args.epochs}")
        schedule.step()
        test_loss, test_acc, _ = evaluate(net, test_spikes, test_y)
        history.append(dict(train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc))
        print(f"epoch {epoch + 1}: train loss {train_loss:.4f} accuracy {train_acc:.4f} | "
              f"held-out loss {test_loss:.4f} accuracy {test_acc:.4f}")
    print(f"training: {time.perf_counter() - start:.1f} s")
    _, accuracy, scores = evaluate(net, test_spikes, test_y)
    print(f"test accuracy: {accuracy:.4f}")

    trains = layer_spikes(net, test_spikes)
    rates = {name: train.mean().item() for name, train in trains}
    figures = [args.out / name for name in ("history.png", "raster.png", "firing_rates.png")]
    plot_history(history, figures[0])
    plot_raster(test_x[0], [(name, train[:, :1]) for name, train in trains], scores[0], test_y[0].item(), figures[1])
    plot_rates(rates, figures[2])
    print("firing rates: " + ", ".join(f"{name} {rate:.3f}" for name, rate in rates.items()))
    print("figures: " + ", ".join(str(path) for path in figures))

    if args.timing_rounds:
        time_epochs(net, train_x, train_y, args)

    # A contiguous example: a slice's strides would tie the exported B to the held-out count.
    paths = export(net, test_spikes[:, :2].contiguous(), args.out, aoti=not args.no_aoti)
    ok = all([run_in_cpp(path, test_spikes, scores, test_y, args.out) for path in paths.values()])
    served = paths.get("AOTInductor", paths["TorchScript"])
    ok = serve(served, test_spikes[:, :1], scores[0].argmax().item()) and ok
    print(f"total: {time.perf_counter() - begin:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
