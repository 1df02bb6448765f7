"""Synthetic cases as a user would load them: generated in worker processes, given as the three phases, one of
them, or the subtraction image, with optional added noise."""

from __future__ import annotations

from typing import Iterator, Literal

import numpy as np
import SimpleITK as sitk

from umlcore.synthetic import SyntheticCase, generate_case

from .workers import ordered_map

__all__ = ["InputMode", "INPUT_MODES", "SINGLE_VOLUME_INPUTS", "synthetic_stream", "input_volumes", "add_noise"]

InputMode = Literal["phases", "pre", "early", "late", "subtraction"]
#: What a user may load: all three phases, one phase, or the subtraction image (early - pre).
INPUT_MODES: tuple[str, ...] = ("phases", "pre", "early", "late", "subtraction")
SINGLE_VOLUME_INPUTS: tuple[str, ...] = INPUT_MODES[1:]
PHASES = ("pre", "early", "late")


def _generate(job: tuple[int, tuple[int, int, int], float]) -> SyntheticCase:
    seed, shape, label_noise = job
    return generate_case(seed, shape=shape, label_noise=label_noise)


def synthetic_stream(seeds: range, shape: tuple[int, int, int], label_noise: float,
                     workers: int = 1) -> Iterator[SyntheticCase]:
    """The synthetic cases of ``seeds`` in order; ``workers > 1`` generates up to ``2 * workers`` of them ahead in
    that many processes."""
    return ordered_map(_generate, [(s, tuple(shape), label_noise) for s in seeds], workers)


def input_volumes(case: SyntheticCase, mode: InputMode) -> list[sitk.Image]:
    """The volumes a user would load for ``case``: its three phases, one phase, or the early - pre subtraction."""
    images = case.to_sitk()
    if mode == "phases":
        return images
    if mode in PHASES:
        return [images[PHASES.index(mode)]]
    if mode == "subtraction":
        return [sitk.Cast(images[1], sitk.sitkFloat32) - sitk.Cast(images[0], sitk.sitkFloat32)]
    raise ValueError(f"unknown input {mode!r}: choose one of {list(INPUT_MODES)}")


def add_noise(images: list[sitk.Image], sigma: float, rng: np.random.Generator) -> list[sitk.Image]:
    """Gaussian noise with ``sigma`` a fraction of each volume's 0.5-99.5 percentile range (``images`` if 0)."""
    if sigma == 0:
        return images
    noisy = []
    for img in images:
        a = sitk.GetArrayFromImage(img).astype(np.float32)
        lo, hi = np.percentile(a, (0.5, 99.5))
        b = sitk.GetImageFromArray(a + rng.normal(0, sigma * (hi - lo), a.shape).astype(np.float32))
        b.CopyInformation(img)
        noisy.append(b)
    return noisy
