"""Noise a robustness evaluation adds to a dataset case's raw channels (``python -m training.evaluate --data ...``).

Both act on a case's channels as the adapters give them (one float array per channel, ``(Z, Y, X)`` or ``(H, W)``,
raw intensities), before the predictor normalises them, and both are drawn from a generator seeded by the case and
the noise level (:func:`noise_rng`), so a report is the same at every run:

- :func:`gaussian_noise`: zero-mean Gaussian noise whose sigma is a fraction of each channel's 0.5-99.5 percentile
  intensity range, as :func:`training.cases.add_noise` adds it to synthetic cases (not clipped);
- :func:`salt_and_pepper`: a fraction of the pixels (voxels) set to each channel's maximum (salt) or minimum
  (pepper), half each, the same pixels in every channel (a pixel of a colour picture turns white or black), as
  the official UML code's ``add_saltPepper_noise`` corrupts whole pixels (there, of pictures scaled to [0, 1]).
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

__all__ = ["NOISE_KINDS", "noise_rng", "gaussian_noise", "salt_and_pepper", "apply_noise"]

#: What a section of a dataset evaluation adds: nothing, Gaussian noise, or salt-and-pepper noise.
NOISE_KINDS = ("none", "gaussian", "salt_and_pepper")


def noise_rng(case_id: str, kind: str, level: float) -> np.random.Generator:
    """The generator of one case's noise of one kind and level (the same at every run and in every process)."""
    case = zlib.crc32(case_id.encode("utf-8"))
    return np.random.default_rng([case, NOISE_KINDS.index(kind), int(round(level * 1e6))])


def gaussian_noise(channels: Sequence[np.ndarray], sigma: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Each channel plus Gaussian noise of standard deviation ``sigma`` times its 0.5-99.5 percentile range.

    Args:
        channels: One array per channel, all of one shape.
        sigma: A fraction of each channel's intensity range (0 returns the channels as float32).
        rng: The generator (:func:`noise_rng`).

    Returns:
        New float32 arrays; the inputs are not modified.
    """
    out = []
    for c in channels:
        a = np.asarray(c, dtype=np.float32)
        if sigma == 0:
            out.append(a.copy())
            continue
        lo, hi = np.percentile(a, (0.5, 99.5))
        out.append(a + rng.normal(0, sigma * (hi - lo), a.shape).astype(np.float32))
    return out


def salt_and_pepper(channels: Sequence[np.ndarray], amount: float, rng: np.random.Generator) -> list[np.ndarray]:
    """``round(amount * pixels)`` pixels, drawn without replacement, set to each channel's maximum (the first half,
    rounded up: salt) or minimum (the rest: pepper); the same pixels in every channel.

    Args:
        channels: One array per channel, all of one shape.
        amount: The fraction of the pixels (voxels) to corrupt, in ``[0, 1]``.
        rng: The generator (:func:`noise_rng`).

    Returns:
        New float32 arrays; the inputs are not modified.
    """
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"salt-and-pepper amount must lie in [0, 1], got {amount}")
    arrays = [np.array(c, dtype=np.float32) for c in channels]  # copies
    if not arrays:
        return arrays
    size = arrays[0].size
    count = int(round(amount * size))
    picked = rng.choice(size, size=count, replace=False) if count else np.zeros(0, np.int64)
    salt, pepper = picked[: count - count // 2], picked[count - count // 2:]
    for a in arrays:
        flat = a.reshape(-1)  # a view: a is contiguous
        hi, lo = float(flat.max()), float(flat.min())
        flat[salt], flat[pepper] = hi, lo
    return arrays


def apply_noise(channels: Sequence[np.ndarray], kind: str, level: float, case_id: str) -> list[np.ndarray]:
    """A case's channels with the noise of one section (``kind`` of :data:`NOISE_KINDS`, ``level`` its sigma or
    amount), drawn from :func:`noise_rng`; ``"none"`` returns float32 copies."""
    if kind == "none":
        return [np.array(c, dtype=np.float32) for c in channels]
    rng = noise_rng(case_id, kind, level)
    if kind == "gaussian":
        return gaussian_noise(channels, level, rng)
    if kind == "salt_and_pepper":
        return salt_and_pepper(channels, level, rng)
    raise ValueError(f"unknown noise {kind!r}: choose one of {', '.join(NOISE_KINDS)}")
