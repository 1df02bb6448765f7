"""The case summary (``summary.json``, documented field by field in ``docs/summary-schema.md``, schema version 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import SimpleITK as sitk

from .fusion import FUSION_RULE, STACKING_RULE, CaseOpinion
from .io import geometry
from .reader import READER_TARGETS, Reading, suspicion
from .registration import PhaseAlignment

if TYPE_CHECKING:  # the predictor imports this module
    from .bundle import ModelBundle
    from .predictor import NetworkSlices

__all__ = ["SUMMARY_SCHEMA_VERSION", "CaseRecord", "build_summary"]

SUMMARY_SCHEMA_VERSION = 2


@dataclass
class CaseRecord:
    """What the predictor found in one case, in slice order (the summary's input).

    Attributes:
        reference: The first input volume (its grid is the outputs' grid).
        axis: The ITK index axis that became the slice axis.
        source: Per network channel, the index of the input volume it came from.
        input_check: What the predictor noticed about the input and did about it (e.g. identical phases read as one).
        input_reasons: Why the input does not look like the model's training images (:mod:`umlcore.inputcheck`);
            any reason makes the verdict "review".
        single_volume: One volume was replicated into every channel.
        network: The network's outputs (:class:`umlcore.predictor.NetworkSlices`).
        lesion_voxels: ``(S,)`` the lesion voxels per slice that weighed the slices' opinions (those of the
            uncertainty-filtered labelmap).
        written: The labelmap written ``(S, H, W)``.
        removed: Components the post-processing (the uncertainty filter, or the reader's check) removed.
        reading: The lesion reader's :class:`~umlcore.reader.Reading`, or ``None`` where it did not read.
        opinion: The case's :class:`~umlcore.fusion.CaseOpinion`.
        alignment: Per channel, what motion correction did, or ``None`` where it did not run.
        timings: Seconds per stage.
    """

    case_id: str
    reference: sitk.Image
    axis: int
    source: list[int]
    input_check: list[str]
    input_reasons: list[str]
    single_volume: bool
    device: str
    precision: str
    threads: int
    network: "NetworkSlices"
    lesion_voxels: np.ndarray
    written: np.ndarray
    removed: int
    reading: Optional[Reading]
    opinion: CaseOpinion
    alignment: Optional[list[PhaseAlignment]]
    timings: dict[str, float]


def build_summary(bundle: "ModelBundle", case: CaseRecord) -> dict[str, Any]:
    """The summary dict of one case (``docs/summary-schema.md``)."""
    card = bundle.card
    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "case_id": case.case_id,
        "inputs": [{"channel": name, "volume": s} for name, s in zip(card.input.channels, case.source)],
        "input_check": {"status": "mismatch" if case.input_reasons else "ok", "reasons": list(case.input_reasons),
                        "notes": list(case.input_check)},
        "model": {"id": card.id, "version": card.version, "sha256": bundle.sha256, "card_sha256": bundle.card_sha256,
                  "path": str(bundle.path)},
        "geometry": geometry(case.reference),
        "slicing": {"axis": card.input.slicing_axis, "index_axis": case.axis, "count": int(len(case.written)),
                    "context_slices": card.input.context_slices},
        "device": case.device,
        "precision": case.precision,
        "threads": case.threads,
        "timings_s": {**case.timings, "total": sum(case.timings.values())},
        "classification": _classification(bundle, case),
        "lesions": _lesions(case),
        "segments": _segments(bundle, case),
        "slices": _slices(case),
        "motion_correction": _motion(bundle, case),
        "postprocessing": {"component_max_uncertainty": card.component_max_uncertainty,
                           "segmentation_min_lesion": None if case.reading is None else card.reader.segmentation_min_lesion,
                           "components_removed": int(case.removed)},
        "outputs": {},
    }


def _classification(bundle: "ModelBundle", case: CaseRecord) -> dict[str, Any]:
    card, alpha = bundle.card, case.opinion.alpha
    strength = float(alpha.sum())
    probs, uncertainty = alpha / strength, float(len(alpha) / strength)
    predicted = int(np.argmax(probs))
    return {
        "classes": list(card.classes),
        "probabilities": [float(v) for v in probs],
        "belief": [float(v) for v in (alpha - 1.0) / strength],
        "uncertainty": uncertainty,
        "predicted_index": predicted,
        "predicted_class": card.classes[predicted],
        "positive_class": card.classes[card.positive_class],
        "positive_probability": float(probs[card.positive_class]),
        "verdict": "review" if uncertainty > card.review_uncertainty or case.input_reasons else "reliable",
        "fusion": FUSION_RULE,
        "calibration": case.opinion.calibration,
        "reader": None if card.reader is None else _reader(bundle, case),
    }


def _reader(bundle: "ModelBundle", case: CaseRecord) -> dict[str, Any]:
    """``classification.reader``: whether the reader's rule made the opinion, why not, and the network's own."""
    network = case.opinion.network
    strength = float(network.sum())
    reading, fitted = case.reading, bundle.card.reader.stacking is not None
    stands = ("the network's opinion stands" if case.opinion.calibration is None else
              f"the network's opinion stands, calibrated by the card's {case.opinion.calibration}")
    if reading is None:
        reason = f"one volume was given: the reader needs every phase (kinetics); {stands}"
    elif not fitted:
        reason = f"the reader's rule is not fitted in this bundle (python -m training.fit opinion): {stands}"
    elif reading.score is None:
        reason = ("nothing was segmented" if not reading.checked_components else
                  "the reader's check kept no lesion") + ": the stacked rule reads the network's opinion alone"
    else:
        reason = None
    return {"applied": reason is None, "reason": reason, "score": None if reading is None else reading.score,
            "fusion": STACKING_RULE, "network_probabilities": [float(v) for v in network / strength],
            "network_uncertainty": float(len(network) / strength)}


def _lesions(case: CaseRecord) -> list[dict[str, Any]]:
    """The lesions the reader read, largest first, with where they lie and what it read."""
    if case.reading is None:
        return []
    ref = case.reference
    voxel_ml = float(np.prod(ref.GetSpacing())) / 1000.0
    numpy_axis = 2 - case.axis  # the slice axis in the (z, y, x) array; H and W are the other two, in order
    rest = [a for a in range(3) if a != numpy_axis]
    out = []
    for rank, ((voxels, z, y, x), p) in enumerate(zip(case.reading.components, case.reading.probabilities)):
        index = [0.0] * 3
        index[numpy_axis], index[rest[0]], index[rest[1]] = float(z), y, x
        ijk = index[::-1]
        out.append({"rank": rank, "voxel_count": int(voxels), "volume_ml": int(voxels) * voxel_ml,
                    "centre_index": [float(v) for v in ijk],
                    "centre_lps": [float(v) for v in ref.TransformContinuousIndexToPhysicalPoint(ijk)],
                    "probabilities": {t: float(v) for t, v in zip(READER_TARGETS, p)},
                    "suspicion": float(suspicion(p))})
    return out


def _segments(bundle: "ModelBundle", case: CaseRecord) -> list[dict[str, Any]]:
    voxel_ml = float(np.prod(case.reference.GetSpacing())) / 1000.0
    out = []
    for seg in bundle.card.segments:
        mask = case.written == seg.label
        count = int(mask.sum())
        out.append({"label": int(seg.label), "name": seg.name, "color": [float(c) for c in seg.color],
                    "voxel_count": count, "volume_ml": count * voxel_ml,
                    "mean_uncertainty": float(case.network.uncertainty[mask].mean(dtype=np.float64)) if count else None})
    return out


def _slices(case: CaseRecord) -> list[dict[str, Any]]:
    """Per slice: its weight in the case opinion (lesion voxels) and the network's own opinion of the slice."""
    alpha = case.network.cls_alpha
    strength = alpha.sum(axis=1)
    return [{"index": s, "lesion_voxels": int(case.lesion_voxels[s]), "probabilities": [float(v) for v in alpha[s] / strength[s]],
             "uncertainty": float(alpha.shape[1] / strength[s])} for s in range(len(alpha))]


def _motion(bundle: "ModelBundle", case: CaseRecord) -> dict[str, Any]:
    mc = bundle.card.input.motion_correction
    out = {"mode": mc.mode, "reference": None if mc.mode == "none" else mc.reference, "phases": [], "reason": None}
    if mc.mode != "none" and case.single_volume:
        out["reason"] = "one volume was given: nothing to align"
    for name, a in zip(bundle.card.input.channels, case.alignment or []):
        if name != mc.reference:
            out["phases"].append({"channel": name, "applied": a.applied, "reason": a.reason,
                                  "shift_mm": None if a.shift_mm is None else [float(v) for v in a.shift_mm]})
    return out
