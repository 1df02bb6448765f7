"""Pure array steps of the predictor: slicing axis, normalisation, in-plane resize, padding, 2.5D context.

Array conventions: ``sitk.GetArrayFromImage`` gives numpy arrays in ``(z, y, x)`` order, i.e. numpy axis
``2 - j`` holds ITK index axis ``j``. :func:`to_slices` moves the slicing axis to the front, giving
``(S, H, W)`` stacks; :func:`from_slices` is its exact inverse (a pure axis permutation: no flips, no
interpolation), so every output lands on the input voxel grid.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .card import Normalization

__all__ = [
    "SlicingAxis",
    "PATIENT_AXIS",
    "slice_axis_index",
    "inplane_axes",
    "to_slices",
    "from_slices",
    "normalize",
    "resized_shape",
    "resize_slices",
    "pad_to_multiple",
    "crop_to",
    "context_indices",
    "with_context",
]

SlicingAxis = Literal["axial", "coronal", "sagittal"]

#: Patient (LPS) axis each slicing axis is perpendicular to: axial -> S (2), coronal -> P (1), sagittal -> L (0).
PATIENT_AXIS: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}


def slice_axis_index(direction: Sequence[float], axis: SlicingAxis) -> int:
    """The ITK index axis (0, 1 or 2) closest to the patient axis of ``axis``.

    Args:
        direction: Row-major 3x3 direction matrix of a 3D image (``image.GetDirection()``); column ``j`` is the
            LPS direction of index axis ``j``.
        axis: ``"axial"`` (slices perpendicular to S), ``"coronal"`` (to P) or ``"sagittal"`` (to L).

    Returns:
        ``argmax_j |D[p, j]|`` with ``p`` the patient axis (the first on ties).
    """
    if axis not in PATIENT_AXIS:
        raise ValueError(f"unknown slicing axis {axis!r}; choose one of {sorted(PATIENT_AXIS)}")
    d = np.asarray(direction, dtype=np.float64)
    if d.size != 9:
        raise ValueError(f"direction must be a 3x3 matrix (9 numbers), got {d.size}")
    return int(np.argmax(np.abs(d.reshape(3, 3)[PATIENT_AXIS[axis]])))


def inplane_axes(slice_axis: int) -> tuple[int, int]:
    """ITK index axes of ``(W, H)`` of the slices when slicing along ``slice_axis`` (increasing order)."""
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
    w, h = (a for a in range(3) if a != slice_axis)
    return w, h


def to_slices(array: np.ndarray, slice_axis: int) -> np.ndarray:
    """``(z, y, x, ...)`` array -> ``(S, H, W, ...)`` with ITK index axis ``slice_axis`` first (a view)."""
    if array.ndim < 3:
        raise ValueError(f"expected a (z, y, x) array, got shape {array.shape}")
    return np.moveaxis(array, 2 - slice_axis, 0)


def from_slices(slices: np.ndarray, slice_axis: int) -> np.ndarray:
    """Exact inverse of :func:`to_slices`: ``(S, H, W, ...)`` -> ``(z, y, x, ...)`` (a view)."""
    if slices.ndim < 3:
        raise ValueError(f"expected an (S, H, W) array, got shape {slices.shape}")
    return np.moveaxis(slices, 0, 2 - slice_axis)


def normalize(volume: np.ndarray, norm: Normalization) -> np.ndarray:
    """Normalise one channel's volume as the model card declares.

    Args:
        volume: Any-shaped intensities of one channel (statistics are taken over the whole volume).
        norm: ``percentile``: clip to the ``[lower, upper]`` percentiles, then scale to ``[0, 1]``;
            ``zscore``: zero mean, unit variance; ``none``: unchanged.

    Returns:
        float32 array of the same shape (all zeros where the statistics are degenerate).
    """
    v = np.asarray(volume, dtype=np.float32)
    if norm.mode == "none":
        return v.copy()
    if norm.mode == "percentile":
        if not 0.0 <= norm.lower < norm.upper <= 100.0:
            raise ValueError(f"percentile normalisation needs 0 <= lower < upper <= 100, got {norm.lower}, {norm.upper}")
        lo, hi = np.percentile(v, [norm.lower, norm.upper])
        if hi <= lo:
            return np.zeros_like(v)
        return ((np.clip(v, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    if norm.mode == "zscore":
        mean, std = float(v.mean(dtype=np.float64)), float(v.std(dtype=np.float64))
        if std <= 0:
            return np.zeros_like(v)
        return ((v - mean) / std).astype(np.float32)
    raise ValueError(f"unknown normalisation mode {norm.mode!r}; choose percentile, zscore or none")


def resized_shape(shape_hw: tuple[int, int], spacing_hw: tuple[float, float], target_hw: tuple[float, float]) -> tuple[int, int]:
    """In-plane size after resampling from ``spacing_hw`` to ``target_hw`` (same physical extent, >= 1)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape_hw, spacing_hw, target_hw))  # type: ignore[return-value]


def resize_slices(x: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear in-plane resize of ``(B, C, H, W)`` to ``size_hw`` (pixel centres aligned as in ITK); no-op if equal."""
    if tuple(x.shape[-2:]) == tuple(size_hw):
        return x
    return F.interpolate(x, size=tuple(size_hw), mode="bilinear", align_corners=False)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last two axes of ``x`` at the end (bottom / right) up to multiples of ``multiple``."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph))


def crop_to(x: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: keep the first ``size_hw`` rows / columns."""
    return x[..., : size_hw[0], : size_hw[1]]


def context_indices(centres: np.ndarray, n_slices: int, context: int) -> np.ndarray:
    """Slice indices ``z - context .. z + context`` around each centre, clamped to the volume (2.5D input).

    Args:
        centres: ``(B,)`` slice indices in ``[0, n_slices)``.
        n_slices: Slices in the volume (>= 1).
        context: Neighbouring slices on each side (>= 0).

    Returns:
        ``(B, 2 * context + 1)`` int64 indices; beyond the first / last slice the edge slice repeats.
    """
    if context < 0 or n_slices < 1:
        raise ValueError(f"context must be >= 0 and n_slices >= 1, got {context} and {n_slices}")
    offsets = np.arange(-context, context + 1)
    return np.clip(np.asarray(centres, dtype=np.int64)[:, None] + offsets[None, :], 0, n_slices - 1)


def with_context(slices, start: int, stop: int, context: int):
    """Slices ``start:stop`` of an ``(S, C, H, W)`` stack with their neighbours as extra channels (2.5D).

    Channel order of the result: for each input channel ``c``, its slices ``z - context .. z + context``, i.e.
    channel ``c * (2 * context + 1) + context + d`` holds channel ``c`` of slice ``z + d``; the edge slice repeats
    beyond the volume's ends (:func:`context_indices`). ``context = 0`` gives ``slices[start:stop]`` unchanged.

    Args:
        slices: ``(S, C, H, W)`` numpy array or torch tensor.
        start, stop: The centre slices, ``0 <= start < stop <= S``.
        context: Neighbouring slices on each side (the model card's ``input.context_slices``).

    Returns:
        ``(stop - start, C * (2 * context + 1), H, W)``, same type (and device) as ``slices``.
    """
    if context == 0:
        return slices[start:stop]
    n, c, h, w = slices.shape
    idx = context_indices(np.arange(start, stop), n, context)  # (b, 2k+1)
    if isinstance(slices, torch.Tensor):
        gathered = slices[torch.from_numpy(idx).to(slices.device)]  # (b, 2k+1, C, H, W)
        return gathered.transpose(1, 2).reshape(stop - start, c * idx.shape[1], h, w)
    gathered = slices[idx]
    return np.ascontiguousarray(gathered.swapaxes(1, 2)).reshape(stop - start, c * idx.shape[1], h, w)
