"""How many CPU threads a prediction uses: the cores that are free when it starts.

PyTorch takes every physical core by default and its OpenMP threads spin while they wait for each other. When another
program keeps a core busy, a thread on that core falls behind and the others spin for it: on a 2-core machine with
one core busy, ``uml predict`` on a 256 x 256 x 96 volume took 22.6-24.6 s with two threads and 10.4-11.2 s with one
(docs/performance.md). :func:`choose_threads` measures how busy this process's cores are over a short interval
(``/proc/stat`` on Linux, before the prediction starts, so the load is other programs') and uses only the free ones,
at least one and at most PyTorch's default.
"""

from __future__ import annotations

import os
import time
from typing import Literal, Optional, Union

import torch

__all__ = ["Threads", "SAMPLE_SECONDS", "busy_cores", "choose_threads"]

Threads = Union[int, Literal["auto"]]
#: How long :func:`busy_cores` watches the cores.
SAMPLE_SECONDS = 0.2


def _cpu_times(cpus: set[int]) -> Optional[tuple[int, int]]:
    """``(busy, total)`` jiffies of ``cpus`` from ``/proc/stat``; ``None`` where it cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return (busy, total) if total else None


def _own_cpus() -> set[int]:
    """The CPUs this process may run on."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def busy_cores(cpus: Optional[set[int]] = None, seconds: float = SAMPLE_SECONDS) -> Optional[float]:
    """How many of ``cpus`` (default: those this process may run on) other work keeps busy now, or ``None``."""
    cpus = _own_cpus() if cpus is None else cpus
    first = _cpu_times(cpus)
    if first is None:
        return None
    time.sleep(seconds)
    second = _cpu_times(cpus)
    if second is None or second[1] <= first[1]:
        return None
    return len(cpus) * (second[0] - first[0]) / (second[1] - first[1])


def choose_threads(requested: Threads = "auto", default: Optional[int] = None) -> int:
    """The threads to use: ``requested`` when a number, else PyTorch's default (``default``) less the busy cores
    (rounded), at least 1."""
    if requested != "auto":
        return max(1, int(requested))
    default = torch.get_num_threads() if default is None else default
    if default <= 1:
        return 1  # nothing to choose: no need to watch the cores
    cpus = _own_cpus()
    busy = busy_cores(cpus)
    if busy is None:
        return default
    return max(1, min(default, int(len(cpus) - busy + 0.5)))
