"""Worker processes for the training scripts: one ordered, bounded map that cannot hang.

``multiprocessing.Pool`` loses a task when its worker dies (killed, out of memory, a failed import in a spawned
child) and then waits for that result forever; a CI run of the test suite once hung for 90 minutes in the test of
evaluate's case pool (the exact trigger was not reproduced).
:func:`ordered_map` uses :class:`concurrent.futures.ProcessPoolExecutor`, which notices a dead worker and raises,
and spawned children (no forked copy of PyTorch's threads).
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

__all__ = ["WorkerError", "ordered_map"]

J = TypeVar("J")
R = TypeVar("R")


class WorkerError(RuntimeError):
    """A worker process died before it returned its result."""


def ordered_map(fn: Callable[[J], R], jobs: Iterable[J], workers: int, ahead: int | None = None) -> Iterator[R]:
    """``fn(job)`` for each job, in the jobs' order.

    Args:
        fn: a module-level function (spawned children import it by name).
        jobs: its arguments, one per call; read lazily.
        workers: processes; ``<= 1`` runs every call in this process, one after another.
        ahead: most calls submitted and not yet taken (default ``2 * workers``), so a slow consumer does not pile
            finished results up in memory.

    Raises:
        WorkerError: a worker process died (the message says which job it was running, and what to try).

    Closing the iterator early (``break``, an exception in the consumer) cancels the calls not yet started and
    waits for the running ones, so no process outlives it.
    """
    if workers <= 1:
        yield from map(fn, jobs)
        return
    ahead = max(ahead or 2 * workers, 1)
    jobs = iter(jobs)
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = collections.deque((j, executor.submit(fn, j)) for j in itertools.islice(jobs, ahead))
        while pending:
            job, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool as e:
                raise WorkerError(f"a worker process died while running {fn.__name__}{_short(job)} ({e}); run with "
                                  "--workers 1 to see the error in this process, or free memory if it was killed") from e
            for j in itertools.islice(jobs, 1):
                pending.append((j, executor.submit(fn, j)))
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _short(job) -> str:
    text = repr(job) if isinstance(job, tuple) else f"({job!r})"
    return text if len(text) <= 80 else text[:77] + "..."
