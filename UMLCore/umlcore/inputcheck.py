"""Does the input look like what the model was trained on? (the predictor's input check)

A model answers whatever it is given; on a scan of another kind its answer means nothing, however confident. The
card declares what made its training images (``input.modality``) and the check measures the input against it:

- an **MR** model given a **CT-like** volume: at least :data:`CT_AIR_SHARE` of the voxels at or below
  :data:`CT_AIR_BELOW` and the first percentile at or below :data:`CT_AIR_HU`, as air is in Hounsfield units. MR
  magnitude images are not negative; a subtraction image is negative only where tissue lost signal, never in a
  large share of air-like values.

A reason makes the case's verdict "review" and is written to ``summary.input_check.reasons``; ``uml predict
--strict-input`` refuses such an input instead. The check reads a regular sample of the voxels (at most
:data:`SAMPLE_VOXELS`), so its cost does not grow with the volume.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .card import ModelCard

__all__ = ["CT_AIR_HU", "CT_AIR_BELOW", "CT_AIR_SHARE", "SAMPLE_VOXELS", "input_reasons"]

CT_AIR_HU = -900.0
CT_AIR_BELOW = -500.0
CT_AIR_SHARE = 0.15
SAMPLE_VOXELS = 1_000_000


def _sample(image: sitk.Image) -> np.ndarray:
    values = sitk.GetArrayViewFromImage(image).reshape(-1)
    step = max(1, values.size // SAMPLE_VOXELS)
    return np.asarray(values[::step], dtype=np.float64)


def input_reasons(card: ModelCard, volumes: Sequence[sitk.Image]) -> list[str]:
    """Why the volumes do not look like the model's training images (empty: nothing found)."""
    if card.input.modality != "MR" or card.input.kind == "picture":
        return []
    for n, image in enumerate(volumes):
        if image.GetNumberOfComponentsPerPixel() != 1:
            continue
        values = _sample(image)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        share = float((values <= CT_AIR_BELOW).mean())
        if share >= CT_AIR_SHARE and float(np.percentile(values, 1)) <= CT_AIR_HU:
            which = f"input volume {n + 1}" if len(volumes) > 1 else "the input"
            return [f"{which} looks like a CT scan in Hounsfield units ({100 * share:.0f} % of its voxels at or below "
                    f"{CT_AIR_BELOW:g}, as air is in CT), but this model was trained on MR scans"]
    return []
