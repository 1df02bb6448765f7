"""The case-level opinion: slice opinions pooled, then the lesion reader's stacked rule or a Platt calibration.

**Lesion-weighted evidence pooling.** The network classifies each 2D slice into a Dirichlet ``alpha_s`` over ``K``
classes (evidence ``e_s = alpha_s - 1``). The case's network opinion is::

    alpha_case = 1 + (sum_s w_s * e_s) / (sum_s w_s),      w_s = lesion voxels of slice s

the lesion-weighted *mean* evidence plus the uniform prior (every slice weighs the same where no slice has a
lesion). Slices that show the lesion carry the information about it; averaging instead of summing keeps the case's
strength ``S`` on the scale of one slice's, so ``u = K / S`` stays comparable with the card's ``review_uncertainty``.

**Then** (:func:`case_opinion`): a multi-phase case of a card with a fitted reader gets the reader's stacked rule
(:func:`stack_reader_opinion`), a logistic model fitted on evaluated cases, which may add the evidence its
probability needs; every other case gets the card's Platt calibration, which keeps the strength (so the uncertainty
and the verdict are the network's). Beliefs and probabilities follow from the final Dirichlet by the usual
subjective-logic formulas, so ``sum_k b_k + u = 1`` holds for the case too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .card import STACKING_TERMS, ModelCard

__all__ = ["FUSION_RULE", "STACKING_RULE", "EVIDENCE_PROBABILITY_CLIP", "STACKING_PROBABILITY_CLIP", "CaseOpinion",
           "case_opinion", "opinion_from_network", "fuse_slice_opinions", "stacking_features", "stack_reader_opinion", "calibrate_case_alpha"]

#: The slice pooling, as the case summary names it (``classification.fusion``).
FUSION_RULE = "lesion-weighted evidence pooling"
#: The reader's rule, as the case summary names it (``classification.reader.fusion``).
STACKING_RULE = "logistic stacking of the network and the reader outputs, the reader adding evidence"
#: The stacked rule keeps the probability in ``[clip, 1 - clip]``: the case strength stays below ``1 / clip``.
EVIDENCE_PROBABILITY_CLIP = 1e-4
#: The stacked rule clips the reader's probabilities to ``[clip, 1 - clip]`` before their log-odds.
STACKING_PROBABILITY_CLIP = 0.01


@dataclass(frozen=True)
class CaseOpinion:
    """A case's opinion.

    Attributes:
        network: ``(K,)`` the network's pooled Dirichlet (before the reader or a calibration).
        alpha: ``(K,)`` the final Dirichlet.
        calibration: The card field that made ``alpha`` from ``network``: ``"reader.stacking"``,
            ``"case_calibration"``, ``"single_volume_calibration"``, or ``None`` (``alpha`` is ``network``).
    """

    network: np.ndarray
    alpha: np.ndarray
    calibration: Optional[str]


def case_opinion(card: ModelCard, slice_alpha: np.ndarray, lesion_voxels: np.ndarray,
                 reader_top: Optional[np.ndarray], single_volume: bool) -> CaseOpinion:
    """The card's case opinion from the slices' Dirichlets.

    Args:
        card: The model card (its reader rule and calibrations).
        slice_alpha: ``(S, K)`` per-slice class Dirichlets.
        lesion_voxels: ``(S,)`` the pooling weights (lesion voxels per slice).
        reader_top: The most suspicious read lesion's ``(3,)`` reader probabilities, or ``None`` (nothing read).
        single_volume: The case was given as one volume replicated into every channel (the reader does not read it).
    """
    return opinion_from_network(card, fuse_slice_opinions(slice_alpha, lesion_voxels), reader_top, single_volume)


def opinion_from_network(card: ModelCard, network: np.ndarray, reader_top: Optional[np.ndarray],
                 single_volume: bool) -> CaseOpinion:
    """The card's case opinion from the network's pooled Dirichlet ``network`` (the rest of :func:`case_opinion`)."""
    if card.reader is not None and card.reader.stacking is not None and not single_volume:
        alpha = stack_reader_opinion(network, reader_top, card.reader.stacking, card.positive_class)
        return CaseOpinion(network, alpha, "reader.stacking")
    name, calibration = card.calibration_for(single_volume)
    if calibration is None:
        return CaseOpinion(network, network, None)
    alpha = calibrate_case_alpha(network, calibration["slope"], calibration["intercept"], card.positive_class)
    return CaseOpinion(network, alpha, name)


def fuse_slice_opinions(slice_alpha: np.ndarray, lesion_voxels: np.ndarray) -> np.ndarray:
    """Fuse per-slice Dirichlet opinions into one case-level Dirichlet (lesion-weighted evidence pooling).

    Args:
        slice_alpha: ``(S, K)`` Dirichlet parameters per slice (all >= 1, finite), ``S >= 1``, ``K >= 2``.
        lesion_voxels: ``(S,)`` non-negative lesion voxel counts per slice (the weights ``w_s``).

    Returns:
        ``(K,)`` float64 ``alpha = 1 + sum_s w_s e_s / sum_s w_s``; uniform weights when ``sum_s w_s == 0``.

    Raises:
        ValueError: wrong shapes, alpha below 1 or not finite, negative or non-finite weights.
    """
    alpha = np.asarray(slice_alpha, dtype=np.float64)
    weights = np.asarray(lesion_voxels, dtype=np.float64)
    if alpha.ndim != 2 or alpha.shape[0] < 1 or alpha.shape[1] < 2:
        raise ValueError(f"slice_alpha must have shape (S, K) with S >= 1 slices and K >= 2 classes, got {alpha.shape}")
    if weights.shape != (alpha.shape[0],):
        raise ValueError(f"lesion_voxels must have shape ({alpha.shape[0]},) (one count per slice), got {weights.shape}")
    if not np.all(np.isfinite(alpha)) or np.any(alpha < 1.0):
        raise ValueError("slice_alpha must be finite and >= 1 (Dirichlet parameters = evidence + 1)")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("lesion_voxels must be finite and non-negative")
    total = weights.sum()
    if total <= 0:
        weights = np.ones_like(weights)
        total = float(weights.size)
    return 1.0 + (weights[:, None] * (alpha - 1.0)).sum(axis=0) / total


def _binary_alpha(p: float, strength: float, positive: int) -> np.ndarray:
    """``strength * (1 - p, p)`` (positive class at ``positive``)."""
    out = np.empty(2)
    out[positive], out[1 - positive] = strength * p, strength * (1.0 - p)
    return out


def _logit(p: np.ndarray, clip: float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), clip, 1.0 - clip)
    return np.log(p / (1.0 - p))


def _check_binary(alpha: np.ndarray) -> np.ndarray:
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.shape != (2,) or not np.all(np.isfinite(alpha)) or np.any(alpha < 1.0):
        raise ValueError(f"this opinion is binary: alpha must be 2 finite values >= 1, got {alpha}")
    return alpha


def stacking_features(network_p: float, reader_p: Optional[np.ndarray]) -> np.ndarray:
    """The values of :data:`~umlcore.card.STACKING_TERMS` for one case: ``(6,)`` float64.

    Args:
        network_p: The network's positive probability (clipped to ``[1e-6, 1 - 1e-6]``).
        reader_p: ``(3,)`` reader probabilities (lesion, spiculated, washout) of the most suspicious lesion read, or
            ``None`` where the reader read nothing: its four terms are then 0, the log-odds of 0.5.

    Returns:
        ``[1, logit(network_p), logit(suspicion), logit(p_lesion), logit(p_spiculated), logit(p_washout)]``, the
        reader's probabilities and the suspicion ``p_lesion (1 - (1 - p_spic)(1 - p_wash))`` clipped to
        ``[STACKING_PROBABILITY_CLIP, 1 - STACKING_PROBABILITY_CLIP]``.
    """
    out = np.zeros(len(STACKING_TERMS))
    out[0] = 1.0
    out[1] = _logit(network_p, 1e-6)
    if reader_p is not None:
        p = np.asarray(reader_p, dtype=np.float64)
        if p.shape != (3,) or not np.all((p >= 0) & (p <= 1)):
            raise ValueError(f"reader_p must be 3 probabilities (lesion, spiculated, washout), got {reader_p!r}")
        out[2] = _logit(p[0] * (1.0 - (1.0 - p[1]) * (1.0 - p[2])), STACKING_PROBABILITY_CLIP)
        out[3:] = _logit(p, STACKING_PROBABILITY_CLIP)
    return out


def stack_reader_opinion(alpha: np.ndarray, reader_p: Optional[np.ndarray], coefficients: dict[str, float],
                         positive: int = 1) -> np.ndarray:
    """The reader's stacked rule: a case opinion from the network's and the reader's by a fitted logistic model.

    ``p' = sigmoid(sum_t coefficients[t] * x_t)`` with ``x`` from :func:`stacking_features` (the network's
    probability ``alpha_pos / S``), clipped to ``[EVIDENCE_PROBABILITY_CLIP, 1 - ...]``; the strength is the
    network's or, where ``p'`` needs more, the least that holds it: ``S' = max(S, 1 / min(p', 1 - p'))``, so
    ``u' = min(u, 2 min(p', 1 - p'))``. It applies where the reader read nothing too (its terms are 0): the model
    was fitted on such cases as well.

    Args:
        alpha: ``(2,)`` the network's case Dirichlet (>= 1, finite).
        reader_p: ``(3,)`` the most suspicious lesion's reader probabilities, or ``None``.
        coefficients: One finite number per term of :data:`~umlcore.card.STACKING_TERMS` (the card's ``reader.stacking``).
        positive: Index of the positive class.

    Returns:
        ``(2,)`` float64 Dirichlet with the same or a larger sum than ``alpha``.

    Raises:
        ValueError: a non-binary or invalid ``alpha``, invalid ``reader_p``, or coefficients that are not exactly
            the terms.
    """
    alpha = _check_binary(alpha)
    if set(coefficients) != set(STACKING_TERMS) or not all(np.isfinite(float(v)) for v in coefficients.values()):
        raise ValueError(f"stacking coefficients must be one finite number for each of {list(STACKING_TERMS)}, "
                         f"got {coefficients!r}")
    strength = float(alpha.sum())
    z = float(np.dot([coefficients[t] for t in STACKING_TERMS], stacking_features(alpha[positive] / strength, reader_p)))
    p = float(np.clip(0.5 * (1.0 + np.tanh(0.5 * z)), EVIDENCE_PROBABILITY_CLIP, 1.0 - EVIDENCE_PROBABILITY_CLIP))
    return np.maximum(_binary_alpha(p, max(strength, 1.0 / min(p, 1.0 - p)), positive), 1.0)  # round-off at the bound


def calibrate_case_alpha(alpha: np.ndarray, slope: float, intercept: float, positive: int = 1) -> np.ndarray:
    """Binary post-hoc (Platt) calibration of a case opinion that keeps its strength.

    ``p' = sigmoid(slope * logit(p_pos) + intercept)`` with ``p_pos = alpha_pos / S``, clipped to
    ``[1/S, 1 - 1/S]`` so each parameter stays >= 1; ``alpha' = S (1 - p', p')``. The uncertainty ``u = K / S`` and
    so the verdict do not move; only the split of the evidence between the classes is recalibrated. ``slope = 1,
    intercept = 0`` is the identity. Fitted by ``python -m training.fit``.

    Raises:
        ValueError: a non-binary ``alpha``.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.shape != (2,):
        raise ValueError(f"Platt calibration is binary: alpha must have shape (2,), got {alpha.shape}")
    strength = float(alpha.sum())
    p = float(np.clip(alpha[positive] / strength, 1e-6, 1 - 1e-6))
    p_new = 1.0 / (1.0 + np.exp(-(slope * np.log(p / (1 - p)) + intercept)))
    return _binary_alpha(float(np.clip(p_new, 1.0 / strength, 1.0 - 1.0 / strength)), strength, positive)
