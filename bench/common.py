"""Shared benchmark harness: ours against folded torch, same machine, same run, one table."""

import platform
import statistics
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.utils.benchmark as benchmark


@dataclass
class Case:
    name: str
    ours: Callable[[], object]
    fold: Callable[[], object]
    # the memory floor: bytes a step must move at least, timed as copies of the same size
    floor: Optional[Callable[[], object]] = None
    floor_copies: float = 0


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    # Timer runs on one thread unless told (num_threads=1 by default): time at the process's count
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def compare(cases: List[Case], rounds: int = 3, min_run_time: float = 0.5) -> List[dict]:
    """Time each case's two functions in alternating rounds (so drift hits both) and report
    the median over rounds of each one's median."""
    rows = []
    for case in cases:
        for _ in range(3):  # warm-up: oneDNN primitive caches, and glibc's mmap threshold, which
            case.ours(), case.fold()  # adapts over the first large allocations (page faults until then)
        ours, fold = [], []
        for _ in range(rounds):
            ours.append(median_seconds(case.ours, min_run_time))
            fold.append(median_seconds(case.fold, min_run_time))
        rows.append(dict(case=case.name, ours_ms=1e3 * statistics.median(ours), fold_ms=1e3 * statistics.median(fold)))
        rows[-1]["ratio"] = rows[-1]["ours_ms"] / rows[-1]["fold_ms"]
        if case.floor is not None:
            rows[-1]["floor_ms"] = 1e3 * case.floor_copies * median_seconds(case.floor, min_run_time)
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import matterhorn_pytorch as mth

    # the builds of the CPU kernels that ran, ours and torch's (ATEN_CPU_CAPABILITY lowers both)
    threads = torch.get_num_threads()
    return (f"{cpu_name()}, {threads} thread{'s' if threads != 1 else ''}, torch {torch.__version__}, CPU kernels: ours "
            f"{mth._C.cpu_capability()}, torch {torch.backends.cpu.get_cpu_capability()}")


def print_table(title: str, rows: List[dict], unit: str = "ms") -> None:
    scale = {"ms": 1.0, "us": 1e3}[unit]
    floors = any("floor_ms" in row for row in rows)
    print(f"\n{title}  ({machine()})")
    print(f"| case | ours ({unit}) | fold ({unit}) | ours / fold |" + (" share of floor: ours / fold |" if floors else ""))
    print("|---|---|---|---|" + ("---|" if floors else ""))
    for row in rows:
        line = f"| {row['case']} | {scale * row['ours_ms']:.3f} | {scale * row['fold_ms']:.3f} | {row['ratio']:.3f} |"
        if "floor_ms" in row:
            line += f" {row['floor_ms'] / row['ours_ms']:.0%} / {row['floor_ms'] / row['fold_ms']:.0%} |"
        print(line + (" |" if floors and "floor_ms" not in row else ""))


def folded(layer):
    """What SpikingJelly's multi-step layers do: the torch.nn layer on the folded [T*B, ...] tensor."""
    return lambda x: layer(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def training_step(layer, forward, x, grad=None):
    """One forward+backward of ``forward(x)`` with fresh gradients (``grad`` or a sum's)."""
    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y = forward(x)
        y.backward(grad) if grad is not None else y.sum().backward()
    return step


def main(title: str, cases: List[Case], unit: str = "ms") -> None:
    """The command line of every bench script: ``--quick`` for a smoke run."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one short round per case (a smoke run)")
    args = parser.parse_args()
    rows = compare(cases, rounds=1 if args.quick else 5, min_run_time=0.1 if args.quick else 1.0)
    print_table(title, rows, unit)
