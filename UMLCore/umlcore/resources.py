"""How much memory a prediction needs, known before the voxels are read, and the machine's limit.

The network's activations dominate: about 600 bytes per pixel of each slice in a batch for the ``small`` preset on
the CPU (measured at 256-1024 pixels square, batch 1-4), growing with the widths of the network's first level. The
predictor chooses the largest batch (at most the one asked for) that fits the limit, and refuses a volume whose
slices do not fit even one at a time: a 4096 x 4096 slice alone needs about 10 GB. Where the card resizes the slices
(``target_size`` or ``target_spacing``), the network's activations are at its size, while the batch's input and
outputs are resized at the slices' own (:data:`RESIZE_BYTES_PER_PIXEL_AND_CHANNEL`).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from .card import ModelCard
from .errors import UMLInputError

__all__ = ["BYTES_PER_PIXEL_AND_WIDTH", "RESIZE_BYTES_PER_PIXEL_AND_CHANNEL", "available_memory_bytes", "memory_limit_bytes", "estimate_bytes", "plan_batch"]

#: Network activation bytes per slice pixel and unit of first-level width (the small preset's 8 + 8 + 8 give about
#: 600 measured, plus a fifth for the allocator).
BYTES_PER_PIXEL_AND_WIDTH = 30
#: Bytes per slice pixel, per network channel and per segmentation label, of a batch's tensors at the slices' own size
#: when the card resizes them: the float32 input, and the Dirichlet resized back with the maps derived from it.
RESIZE_BYTES_PER_PIXEL_AND_CHANNEL = 16
#: The share of the memory available when the run starts that a run may take by default.
DEFAULT_SHARE = 0.7


def available_memory_bytes() -> int:
    """The memory available to new allocations (Linux ``MemAvailable``; elsewhere half the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def memory_limit_bytes(max_memory_gb: Optional[float] = None) -> int:
    """The limit a run keeps to: ``max_memory_gb`` if given, else :data:`DEFAULT_SHARE` of the memory available."""
    if max_memory_gb is not None:
        if not max_memory_gb > 0:
            raise UMLInputError(f"the memory limit must be a positive number of GB, got {max_memory_gb!r}")
        return int(max_memory_gb * (1 << 30))
    return int(DEFAULT_SHARE * available_memory_bytes())


def estimate_bytes(card: ModelCard, slices: int, slice_hw: Sequence[int], batch: int,
                   network_hw: Optional[Sequence[int]] = None) -> int:
    """Bytes a prediction of ``slices`` slices of ``slice_hw`` pixels needs at ``batch``, the network reading them
    at ``network_hw`` pixels (default: ``slice_hw``; the card's ``target_size`` or ``target_spacing`` size)."""
    arch = card.architecture
    multiple = arch.pad_multiple
    network_hw = slice_hw if network_hw is None else network_hw
    h, w = (-(-int(n) // multiple) * multiple for n in network_hw)
    width = arch.cls_widths[0] + arch.seg_widths[0] + arch.mutual_widths[0]
    network = h * w * batch * width * BYTES_PER_PIXEL_AND_WIDTH
    pixels = int(slice_hw[0]) * int(slice_hw[1])
    if tuple(int(n) for n in network_hw) != tuple(int(n) for n in slice_hw):
        network += pixels * batch * (arch.in_channels + arch.num_seg_labels) * RESIZE_BYTES_PER_PIXEL_AND_CHANNEL
    arrays = slices * pixels * (4 * arch.in_channels + 4 * len(card.input.channels) + 20)  # stack, inputs, outputs
    return network + arrays


def plan_batch(card: ModelCard, slices: int, slice_hw: Sequence[int], batch: int, limit: int, size_text: str,
               network_hw: Optional[Sequence[int]] = None) -> int:
    """The largest batch up to ``batch`` whose estimate fits ``limit`` (:func:`estimate_bytes`).

    Raises:
        UMLInputError: not even one slice at a time fits (the message names the need, the limit and the fixes).
    """
    while batch > 1 and estimate_bytes(card, slices, slice_hw, batch, network_hw) > limit:
        batch //= 2
    need = estimate_bytes(card, slices, slice_hw, 1, network_hw)
    if need > limit:
        raise UMLInputError(
            f"a {size_text} volume needs about {_gb(need)} GB of memory to segment, more than the limit of "
            f"{_gb(limit)} GB (--max-memory-gb, by default {int(DEFAULT_SHARE * 100)} % of the memory available): "
            "crop or resample it to smaller slices, or raise the limit with --max-memory-gb")
    return batch


def _gb(n: int) -> str:
    """Bytes as GB with one decimal, or two significant digits below 1 GB (0.05, not 0.0)."""
    gb = n / 2**30
    return f"{gb:.1f}" if gb >= 1 else f"{gb:.2g}"
