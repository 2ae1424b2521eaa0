"""Shared benchmark harness: ours against folded torch, same machine, same run, one table."""

import platform
import statistics
from dataclasses import dataclass
from typing import Callable, List

import torch
import torch.utils.benchmark as benchmark


@dataclass
class Case:
    name: str
    ours: Callable[[], object]
    fold: Callable[[], object]


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def compare(cases: List[Case], rounds: int = 3, min_run_time: float = 0.5) -> List[dict]:
    """Time each case's two functions in alternating rounds (so drift hits both) and report
    the median over rounds of each one's median."""
    rows = []
    for case in cases:
        case.ours(), case.fold()  # warm-up: allocator, oneDNN primitive caches
        ours, fold = [], []
        for _ in range(rounds):
            ours.append(median_seconds(case.ours, min_run_time))
            fold.append(median_seconds(case.fold, min_run_time))
        rows.append(dict(case=case.name, ours_ms=1e3 * statistics.median(ours), fold_ms=1e3 * statistics.median(fold)))
        rows[-1]["ratio"] = rows[-1]["ours_ms"] / rows[-1]["fold_ms"]
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
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_table(title: str, rows: List[dict]) -> None:
    print(f"\n{title}  ({machine()})")
    print("| case | ours (ms) | fold (ms) | ours / fold |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['ours_ms']:.3f} | {row['fold_ms']:.3f} | {row['ratio']:.3f} |")
