"""Motion correction between the phases of a multi-phase case (the predictor's step "align").

A patient who moves between the pre-contrast and the post-contrast acquisitions of a DCE-MRI leaves the phases
offset against each other; the network then reads a lesion's enhancement (post minus pre) from tissue that is not
the lesion. A card whose ``input.motion_correction.mode`` is ``"translation"`` has the predictor move every other
phase onto its ``reference`` phase (the first post-contrast phase, where the lesion is seen and drawn) by the 3D
translation that best aligns the two, before anything else reads them. The outputs stay on the input grid: only
the network's (and the lesion reader's) view of the moved phases changes.

The translation is found by SimpleITK's registration framework: Mattes mutual information (the phases differ in
contrast where tissue enhances, not in anatomy), a regular-step gradient descent over three resolution levels,
a fixed regular sample of the voxels, the result rounded to 1e-6 mm (so the same inputs give the same
translation). A translation longer than the card's ``max_shift_mm`` is not applied: that is a failed registration
or volumes of different scans, and the summary says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

__all__ = ["PhaseAlignment", "estimate_translation", "translate", "align_phases"]

_SAMPLES = 30_000  # voxels the metric samples per level (at most): 0.09 mm median error, about 0.6 s a phase (2-core CPU)
_MIN_LEVEL_SIZE = 4  # a resolution level keeps at least this many voxels along every axis


@dataclass(frozen=True)
class PhaseAlignment:
    """What motion correction did to one phase.

    Attributes:
        shift_mm: The estimated displacement of this phase's content against the reference phase, LPS mm
            ``(x, y, z)``: the phase was resampled at ``p + shift_mm`` for every reference point ``p``. ``None``
            for the reference phase itself, or where the registration failed.
        applied: Whether the phase was moved.
        reason: Why not, when it was not (``None`` otherwise).
    """

    shift_mm: Optional[tuple[float, float, float]]
    applied: bool
    reason: Optional[str] = None


def _shrink_factors(size: Sequence[int]) -> list[int]:
    """Shrink factors 4, 2, 1 (coarse to fine), without the levels that would leave fewer than
    ``_MIN_LEVEL_SIZE`` voxels along an axis."""
    return [f for f in (4, 2) if min(size) // f >= _MIN_LEVEL_SIZE] + [1]


def estimate_translation(fixed: sitk.Image, moving: sitk.Image) -> tuple[float, float, float]:
    """The 3D translation that best aligns ``moving`` to ``fixed`` (both 3D, on one grid or not).

    Args:
        fixed: The reference volume.
        moving: The volume to align to it.

    Returns:
        ``(x, y, z)`` in LPS mm: ``moving`` at ``p + t`` shows what ``fixed`` shows at ``p``.

    Raises:
        RuntimeError: SimpleITK could not register the volumes (e.g. too few voxels overlap).
    """
    f = sitk.Cast(fixed, sitk.sitkFloat32)
    m = sitk.Cast(moving, sitk.sitkFloat32)
    shrink = _shrink_factors(fixed.GetSize())
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(1)  # for 30,000 samples a level one thread is faster than several
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    n_voxels = int(np.prod(fixed.GetSize()))
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(min(1.0, _SAMPLES / n_voxels), 1)  # a fixed seed: the same samples each run
    reg.SetMetricUseMovingImageGradientFilter(False)  # gradients at the samples only, not of the whole volume
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=0.01, numberOfIterations=100,
                                                 relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel([s / 2.0 for s in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(sitk.TranslationTransform(3), inPlace=False)
    transform = reg.Execute(f, m)
    # ITK's filters sum in a thread-dependent order, which moves the result in its last bits from run to run;
    # rounded to 1e-6 mm, the same inputs give the same translation (and the same outputs downstream)
    return tuple(round(float(v), 6) for v in transform.GetParameters())  # type: ignore[return-value]


def translate(moving: sitk.Image, reference: sitk.Image, shift_mm: Sequence[float]) -> sitk.Image:
    """``moving`` resampled on ``reference``'s grid at ``p + shift_mm`` (linear interpolation, float32; points
    beyond the volume take the nearest edge voxel, so no band of zeros enters at the border)."""
    transform = sitk.TranslationTransform(3, [float(v) for v in shift_mm])
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(reference)
    resampler.SetTransform(transform)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampler.SetUseNearestNeighborExtrapolator(True)
    return resampler.Execute(moving)


def align_phases(volumes: Sequence[sitk.Image], reference: int,
                 max_shift_mm: float) -> tuple[list[sitk.Image], list[PhaseAlignment]]:
    """Move every volume but ``volumes[reference]`` onto it by the translation that best aligns them.

    Args:
        volumes: 3D volumes of one case (its phases), on one grid.
        reference: Index of the volume the others are aligned to; it is returned as it is.
        max_shift_mm: A longer estimated translation is not applied (the volume is returned as it is).

    Returns:
        ``(aligned, alignments)``: the volumes in the same order (each moved volume float32 on the reference grid)
        and one :class:`PhaseAlignment` per volume.
    """
    fixed = volumes[reference]
    aligned: list[sitk.Image] = []
    records: list[PhaseAlignment] = []
    for i, volume in enumerate(volumes):
        if i == reference:
            aligned.append(volume)
            records.append(PhaseAlignment(shift_mm=None, applied=False, reason="the reference phase"))
            continue
        try:
            shift = estimate_translation(fixed, volume)
        except RuntimeError as exc:
            aligned.append(volume)
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            records.append(PhaseAlignment(shift_mm=None, applied=False, reason=f"registration failed ({first})"))
            continue
        length = float(np.linalg.norm(shift))
        if not np.isfinite(length) or length > max_shift_mm:
            aligned.append(volume)
            records.append(PhaseAlignment(
                shift_mm=shift, applied=False,
                reason=f"the estimated shift ({length:.1f} mm) is longer than the card's {max_shift_mm:g} mm: "
                       "left as it is (a failed registration, or volumes of different scans)"))
            continue
        aligned.append(translate(volume, fixed, shift))
        records.append(PhaseAlignment(shift_mm=shift, applied=True))
    return aligned, records
