"""training.workers: ordered results, early close, and a dead worker raises instead of hanging."""

import multiprocessing
import os

import pytest

from training.workers import WorkerError, ordered_map


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_in_the_jobs_order(workers):
    assert list(ordered_map(abs, [-3, 2, -1, 0, -7], workers, ahead=2)) == [3, 2, 1, 0, 7]


def test_closing_early_leaves_no_worker_process():
    results = ordered_map(abs, range(-50, 0), 2)
    assert next(results) == 50
    results.close()
    assert not multiprocessing.active_children()


def test_a_worker_that_dies_raises_a_worker_error_naming_the_job():
    with pytest.raises(WorkerError, match=r"_exit\(3\).*--workers 1"):
        list(ordered_map(os._exit, [3], 2))
    assert not multiprocessing.active_children()
