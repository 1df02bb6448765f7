"""``umlcore.threads``: the threads a prediction uses are the cores that are free when it starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from umlcore.threads import busy_cores, choose_threads


def test_a_number_is_taken_as_given_and_auto_stays_within_the_default():
    assert choose_threads(3) == 3 and choose_threads(1, default=8) == 1
    assert 1 <= choose_threads("auto", default=2) <= 2
    assert choose_threads("auto", default=1) == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/stat"), reason="Linux only")
def test_a_core_kept_busy_by_another_program_counts_as_busy():
    cpu = min(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    try:
        os.sched_setaffinity(spinner.pid, {cpu})
        busy_cores({cpu}, 0.3)  # the spinner is running before the measurement
        assert busy_cores({cpu}, 0.5) > 0.7
    finally:
        spinner.kill()
        spinner.wait()
