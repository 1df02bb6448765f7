"""The C allocator tuned for large tensors (glibc only): freed activations are kept and reused, not returned.

PyTorch's CPU tensors come from ``malloc``. With glibc's defaults every block above the dynamic mmap threshold
(128 KiB at first) is a fresh ``mmap``: the kernel maps and zeroes it on first touch and takes it back on ``free``,
so a network whose activations are a few MiB spends much of its time in the kernel (measured: sys 6.8-8.3 s of a
12-14 s ``uml predict`` on a 256 x 256 x 96 volume). :func:`tune_allocator` raises the mmap threshold to glibc's
maximum (32 MiB on 64-bit), keeps up to 1 GiB of freed memory at the top of the heap before trimming it, and
grows the heap 256 MiB at a time -- the ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_TOP_PAD_`` environment settings, applied with ``mallopt`` at run time so that nobody has to set them.
The ``uml`` command line calls it at start-up; it changes nothing but speed and the memory kept after a peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "TOP_PAD", "tune_allocator"]

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1024 * 1024 * 1024
TOP_PAD = 256 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # <malloc.h>


def tune_allocator() -> bool:
    """Apply the settings when this process runs on glibc; True when all three were accepted."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in
               ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
