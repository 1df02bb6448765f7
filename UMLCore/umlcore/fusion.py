"""Case-level opinion from slice-level Dirichlet opinions: **lesion-weighted evidence pooling**.

The network classifies each 2D slice into a Dirichlet ``alpha_s`` over ``K`` classes (evidence
``e_s = alpha_s - 1``). A case gets one Dirichlet::

    alpha_case = 1 + (sum_s w_s * e_s) / (sum_s w_s),      w_s = lesion voxels of slice s

i.e. the lesion-weighted *mean* evidence of the slices, plus the uniform prior. When no slice has lesion
voxels every slice gets the same weight (plain mean evidence).

Why this rule:

- Slices that show the lesion carry the information about it, so they dominate; slices without lesion
  voxels add nothing while any slice has some.
- Averaging (instead of summing) evidence keeps the case's strength ``S`` on the scale of one slice's, so the
  case uncertainty ``u = K / S`` stays comparable with the slice uncertainties and with the bundle's
  ``review_uncertainty`` threshold; summing would make any case with many slices look certain.
- Beliefs and probabilities follow from ``alpha_case`` by the usual subjective-logic formulas
  (``b_k = e_k / S``, ``u = K / S``, ``p_k = alpha_k / S``), so ``sum_k b_k + u = 1`` holds for the case too.
"""

from __future__ import annotations

from typing import Literal, Optional, get_args

import numpy as np

__all__ = ["EVIDENCE_PROBABILITY_CLIP", "FUSION_RULE", "READER_FUSION_RULE", "READER_FUSION_RULES", "READER_SCORE_CLIP",
           "READER_WEIGHT_MAX", "STACKING_PROBABILITY_CLIP", "STACKING_TERMS",
           "ReaderFusion",
           "fuse_slice_opinions", "fuse_reader_opinion", "stack_reader_opinion", "stacking_features",
           "calibrate_case_alpha", "fit_logistic", "fit_platt"]

#: Name of the rule, as written into the case summary (``classification.fusion``).
FUSION_RULE = "lesion-weighted evidence pooling"
#: How the lesion reader's score enters the case opinion (the card's ``reader.fusion``):
#: ``"average"`` moves the probability a share ``weight`` of the way to the score (models 1.3.0 and 1.3.1);
#: ``"logit"`` adds ``weight * logit(score)`` to the opinion's log-odds (built for 1.3.1, not chosen:
#: inside the kept strength it lost on validation; docs/model.md "What changed in 1.3.1");
#: ``"evidence"`` pools the log-odds the same way and lets the reader add the evidence that the pooled (and the
#: calibrated) probability needs, so the case uncertainty may fall below the network's (models from 1.4.0);
#: ``"stacked"`` replaces the pooling and the Platt step by a fitted logistic model of the network's log-odds and of
#: the most suspicious lesion's suspicion and three reader outputs (:func:`stack_reader_opinion`; models from 1.8.0).
ReaderFusion = Literal["average", "logit", "evidence", "stacked"]
#: The rule of each mode, as written into the case summary (``classification.reader.fusion``).
READER_FUSION_RULES = {"average": "averaging fusion at equal uncertainty",
                       "logit": "log-odds pooling at equal uncertainty",
                       "evidence": "log-odds pooling, the reader adding evidence",
                       "stacked": "logistic stacking of the network and the reader outputs, the reader adding evidence"}
assert set(READER_FUSION_RULES) == set(get_args(ReaderFusion))
#: The largest reader weight of each rule (a share for ``"average"``, a log-odds factor for the others).
#: ``"stacked"`` keeps its weights in the card's ``reader.stacking`` coefficients; its ``weight`` must be 1.
READER_WEIGHT_MAX = {"average": 1.0, "logit": 4.0, "evidence": 4.0, "stacked": 1.0}
#: The ``"average"`` rule's name (the rule of the shipped models 1.3.0 and 1.3.1).
READER_FUSION_RULE = READER_FUSION_RULES["average"]
#: ``"logit"`` clips the reader's score to ``[clip, 1 - clip]``: one patch moves the log-odds by at most
#: ``weight * 6.9``, however sure the reader is.
READER_SCORE_CLIP = 1e-3
#: ``"evidence"`` and a calibration with ``min_strength`` keep the probability in ``[clip, 1 - clip]``: the case
#: strength stays below ``1 / clip`` (the uncertainty above ``2 * clip``).
EVIDENCE_PROBABILITY_CLIP = 1e-4


def _binary_alpha(p: float, strength: float, positive: int, least: Optional[float] = None) -> np.ndarray:
    """``strength * (1 - p, p)`` (positive class at ``positive``); with ``least`` given, ``p`` clipped to
    ``[EVIDENCE_PROBABILITY_CLIP, 1 - ...]`` and the strength ``max(least, 1 / min(p, 1 - p))``, the least that
    holds ``p`` (each parameter then >= 1)."""
    if least is not None:
        p = float(np.clip(p, EVIDENCE_PROBABILITY_CLIP, 1.0 - EVIDENCE_PROBABILITY_CLIP))
        strength = max(float(least), 1.0 / min(p, 1.0 - p))
    out = np.empty(2)
    out[positive], out[1 - positive] = strength * p, strength * (1.0 - p)
    return out if least is None else np.maximum(out, 1.0)  # round-off at the bound


#: The terms of the ``"stacked"`` rule, in order: its constant, the network's log-odds, and the log-odds of the most
#: suspicious read lesion's suspicion and of its reader outputs (:data:`umlcore.reader.READER_TARGETS`).
STACKING_TERMS = ("intercept", "network", "suspicion", "lesion", "spiculated", "washout")
#: ``"stacked"`` clips the reader's probabilities to ``[clip, 1 - clip]`` before their log-odds: a sure reader moves
#: a term by at most ``coefficient * 4.6``.
STACKING_PROBABILITY_CLIP = 0.01


def _logit(p: np.ndarray, clip: float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), clip, 1.0 - clip)
    return np.log(p / (1.0 - p))


def stacking_features(network_p: float, reader_p: Optional[np.ndarray]) -> np.ndarray:
    """The values of :data:`STACKING_TERMS` for one case: ``(6,)`` float64.

    Args:
        network_p: The network's positive probability (clipped to ``[1e-6, 1 - 1e-6]``, as the other rules do).
        reader_p: ``(3,)`` reader probabilities (lesion, spiculated, washout) of the most suspicious component, or
            ``None`` where the reader read nothing (nothing was segmented): its four terms are then 0, the log-odds
            of 0.5.

    Returns:
        ``[1, logit(network_p), logit(suspicion), logit(p_lesion), logit(p_spiculated), logit(p_washout)]`` with the
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
    """The ``"stacked"`` rule: a case opinion from the network's and the reader's by a fitted logistic model.

    ``p' = sigmoid(sum_t coefficients[t] * x_t)`` over :data:`STACKING_TERMS` with ``x`` from
    :func:`stacking_features` (the network's probability ``alpha_pos / S``); the strength as ``"evidence"`` gives it,
    ``S' = max(S, 1 / min(p', 1 - p'))``, so ``u' = min(u, 2 min(p', 1 - p'))``. Unlike the other rules it applies
    also where the reader read nothing (its terms are 0), since the model was fitted on such cases too, and its
    output is calibrated by the fit itself (the card's Platt calibration is the identity).

    Args:
        alpha: ``(2,)`` the network's case Dirichlet (>= 1, finite).
        reader_p: ``(3,)`` the most suspicious component's reader probabilities, or ``None``.
        coefficients: One finite number per term of :data:`STACKING_TERMS` (the card's ``reader.stacking``).
        positive: Index of the positive class.

    Returns:
        ``(2,)`` float64 Dirichlet with the same or a larger sum than ``alpha``.

    Raises:
        ValueError: a non-binary or invalid ``alpha``, invalid ``reader_p``, or coefficients that are not exactly
            the terms.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.shape != (2,) or not np.all(np.isfinite(alpha)) or np.any(alpha < 1.0):
        raise ValueError(f"the reader fusion is binary: alpha must be 2 finite values >= 1, got {alpha}")
    if set(coefficients) != set(STACKING_TERMS) or not all(np.isfinite(float(v)) for v in coefficients.values()):
        raise ValueError(f"stacking coefficients must be one finite number for each of {list(STACKING_TERMS)}, "
                         f"got {coefficients!r}")
    strength = float(alpha.sum())
    z = float(np.dot([coefficients[t] for t in STACKING_TERMS], stacking_features(alpha[positive] / strength, reader_p)))
    return _binary_alpha(0.5 * (1.0 + np.tanh(0.5 * z)), strength, positive, least=strength)


def fuse_slice_opinions(slice_alpha: np.ndarray, lesion_voxels: np.ndarray) -> np.ndarray:
    """Fuse per-slice Dirichlet opinions into one case-level Dirichlet (lesion-weighted evidence pooling).

    Args:
        slice_alpha: ``(S, K)`` Dirichlet parameters per slice (all >= 1, finite), ``S >= 1``, ``K >= 2``.
        lesion_voxels: ``(S,)`` non-negative lesion voxel counts per slice (the weights ``w_s``).

    Returns:
        ``(K,)`` float64 case-level Dirichlet ``alpha = 1 + sum_s w_s e_s / sum_s w_s`` with ``e_s = alpha_s - 1``;
        uniform weights when ``sum_s w_s == 0``.

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
    evidence = alpha - 1.0
    return 1.0 + (weights[:, None] * evidence).sum(axis=0) / total


def fuse_reader_opinion(alpha: np.ndarray, score: float, weight: float, positive: int = 1,
                        mode: ReaderFusion = "average") -> np.ndarray:
    """Merge the lesion reader's score into a binary case opinion.

    ``"average"`` and ``"logit"`` keep the opinion's strength ``S``: the reader gives a probability, not evidence,
    so only the split of the case's evidence between the classes moves, and the uncertainty ``u = 2 / S`` and the
    verdict ``u > review`` do not move. ``"evidence"`` may raise ``S``.

    - ``"average"``: the reader's opinion gets the case opinion's uncertainty, the case's total evidence ``S - 2``
      split as the reader's probability says, ``e_r = (S - 2) (1 - score, score)``, and the two are averaged with
      weight ``weight`` on the reader: ``alpha' = 1 + (1 - weight) e + weight e_r``. For two opinions of equal
      uncertainty this is subjective logic's averaging fusion (beliefs averaged, uncertainty kept); the positive
      probability moves towards ``score`` by ``weight`` of the way (up to the prior's ``1 / S``).
    - ``"logit"``: the reader's score counts as independent evidence about the case, tempered by ``weight``:
      ``logit(p') = logit(p) + weight * logit(score)`` (a naive-Bayes update of the odds; the score clipped to
      ``[READER_SCORE_CLIP, 1 - READER_SCORE_CLIP]``), then ``alpha' = S (1 - p', p')`` kept >= 1. A sure reader
      overrides an undecided network, and a score of 0.5 changes nothing.
    - ``"evidence"``: the same pooled ``p'`` (clipped to ``[EVIDENCE_PROBABILITY_CLIP, 1 - ...]`` only), with the
      strength the network had or, where ``p'`` leaves ``[1/S, 1 - 1/S]``, the least strength that holds it:
      ``S' = max(S, 1 / min(p', 1 - p'))``, ``alpha' = S' (1 - p', p')``. The reader adds evidence only as far as
      its pooled opinion needs, so ``u' = min(u, 2 min(p', 1 - p'))``: a sure reader makes a sure case. (The
      predictor then calibrates with ``min_strength = S``, see :func:`calibrate_case_alpha`.)

    Args:
        alpha: ``(2,)`` case Dirichlet (>= 1, finite).
        score: The reader's probability of the positive class, in [0, 1].
        weight: The reader's share (``"average"``, in [0, 1]) or its log-odds factor (``"logit"``, ``"evidence"``,
            in [0, 4]); 0 returns ``alpha`` unchanged.
        positive: Index of the positive class.
        mode: The rule (the card's ``reader.fusion``).

    Returns:
        ``(2,)`` float64 Dirichlet with the same sum as ``alpha`` (``"evidence"``: the same or a larger sum).

    Raises:
        ValueError: a non-binary or invalid ``alpha``, ``score`` outside [0, 1], ``weight`` outside its mode's range,
            or an unknown ``mode``.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.shape != (2,) or not np.all(np.isfinite(alpha)) or np.any(alpha < 1.0):
        raise ValueError(f"the reader fusion is binary: alpha must be 2 finite values >= 1, got {alpha}")
    if mode not in READER_FUSION_RULES:
        raise ValueError(f"unknown reader fusion {mode!r}: use one of {sorted(READER_FUSION_RULES)}")
    if mode == "stacked":
        raise ValueError("the 'stacked' rule needs the reader's outputs and the card's coefficients: use "
                         "stack_reader_opinion")
    top = READER_WEIGHT_MAX[mode]
    if not (0.0 <= score <= 1.0 and 0.0 <= weight <= top):
        raise ValueError(f"the score must lie in [0, 1] and a {mode!r} weight in [0, {top:g}], "
                         f"got score {score}, weight {weight}")
    if weight == 0.0:
        return alpha.copy()
    if mode in ("logit", "evidence"):
        strength = float(alpha.sum())
        p = float(np.clip(alpha[positive] / strength, 1e-6, 1 - 1e-6))
        s = float(np.clip(score, READER_SCORE_CLIP, 1 - READER_SCORE_CLIP))
        z = np.log(p / (1 - p)) + weight * np.log(s / (1 - s))
        p_new = 1.0 / (1.0 + np.exp(-z))
        if mode == "evidence":
            return _binary_alpha(p_new, strength, positive, least=strength)
        return np.maximum(_binary_alpha(float(np.clip(p_new, 1.0 / strength, 1.0 - 1.0 / strength)), strength,
                                        positive), 1.0)  # round-off at the bound
    evidence = alpha - 1.0
    reader = np.empty(2)
    reader[positive], reader[1 - positive] = score, 1.0 - score
    return 1.0 + (1.0 - weight) * evidence + weight * evidence.sum() * reader


def calibrate_case_alpha(alpha: np.ndarray, slope: float, intercept: float, positive: int = 1,
                         min_strength: Optional[float] = None) -> np.ndarray:
    """Binary post-hoc (Platt) calibration of a case opinion.

    ``p' = sigmoid(slope * logit(p_pos) + intercept)`` with ``p_pos = alpha_pos / S``. ``slope = 1, intercept = 0``
    is the identity.

    - ``min_strength=None`` keeps the strength ``S``: ``alpha'_pos = S p'``, ``alpha'_neg = S (1 - p')``, each kept
      >= 1 (``p'`` clipped to ``[1/S, 1 - 1/S]``). The uncertainty ``u = K / S`` is unchanged, so the "review"
      verdict does not move; only the split of the evidence between the classes is recalibrated.
    - ``min_strength=S0`` (the reader rule ``"evidence"``, with ``S0`` the network's strength before the reader):
      the calibrated opinion gets ``S0``, raised as far as ``p'`` needs, ``S' = max(S0, 1 / min(p', 1 - p'))``;
      ``p'`` is not clipped to the bounds (only to ``[EVIDENCE_PROBABILITY_CLIP, 1 - ...]``), so
      ``u' = min(2 / S0, 2 min(p', 1 - p'))``: the evidence the reader added is what the final probability needs.

    Args:
        alpha: ``(2,)`` case Dirichlet.
        slope, intercept: Fitted on validation cases (``training/evaluate.py --calibrate-cases``).
        positive: Index of the positive class.
        min_strength: ``None``, or the strength the result has at least (>= 2).

    Raises:
        ValueError: a non-binary ``alpha`` or a ``min_strength`` below 2.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.shape != (2,):
        raise ValueError(f"Platt calibration is binary: alpha must have shape (2,), got {alpha.shape}")
    if min_strength is not None and not min_strength >= 2.0:
        raise ValueError(f"min_strength must be >= 2 (a binary Dirichlet's least strength), got {min_strength}")
    strength = float(alpha.sum())
    p = float(np.clip(alpha[positive] / strength, 1e-6, 1 - 1e-6))
    z = slope * np.log(p / (1 - p)) + intercept
    p_new = 1.0 / (1.0 + np.exp(-z))
    if min_strength is not None:
        return _binary_alpha(p_new, strength, positive, least=min_strength)
    return _binary_alpha(float(np.clip(p_new, 1.0 / strength, 1.0 - 1.0 / strength)), strength, positive)


def fit_platt(probs: np.ndarray, labels: np.ndarray, iterations: int = 200) -> tuple[float, float]:
    """``(slope, intercept)`` minimising the NLL of ``sigmoid(slope * logit(p) + intercept)``.

    Newton steps with a backtracking line search (a step is halved until the NLL does not rise): plain Newton
    steps diverge from the identity start when some logits are large, e.g. fused opinions far from 0.5.

    Args:
        probs: ``(N,)`` positive-class probabilities (clipped to ``[1e-6, 1 - 1e-6]``).
        labels: ``(N,)`` 0/1 labels, both present.
        iterations: The most Newton steps.

    Raises:
        ValueError: shapes differ, or one class is missing.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-6, 1 - 1e-6)
    y = np.asarray(labels, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 1 or len(np.unique(y)) < 2:
        raise ValueError("fit_platt needs (N,) probabilities and (N,) labels with both classes present")
    x = np.stack([np.log(p / (1 - p)), np.ones_like(p)], axis=1)
    w = fit_logistic(x, y, start=np.array([1.0, 0.0]), iterations=iterations)
    return float(w[0]), float(w[1])


def fit_logistic(features: np.ndarray, labels: np.ndarray, penalty: Optional[np.ndarray] = None,
                 start: Optional[np.ndarray] = None, iterations: int = 200) -> np.ndarray:
    """The weights ``w`` minimising ``sum NLL(sigmoid(features @ w), labels) + sum(penalty * w**2) / 2``.

    Newton steps with a backtracking line search (a step is halved until the objective does not rise), from
    ``start`` (default zeros), until a step moves no weight by 1e-9. Used by :func:`fit_platt` and by the stacked
    reader rule's fit (``training/fit_reader_fusion.py``).

    Args:
        features: ``(N, D)`` (a column of ones for an intercept).
        labels: ``(N,)`` 0/1.
        penalty: ``(D,)`` L2 penalty per weight (default none).
        start: ``(D,)`` the first weights.
        iterations: The most Newton steps.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    d = x.shape[1]
    lam = np.zeros(d) if penalty is None else np.asarray(penalty, dtype=np.float64)

    def objective(w: np.ndarray) -> float:  # overflow-free
        z = x @ w
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(lam * w * w))

    w = np.zeros(d) if start is None else np.asarray(start, dtype=np.float64).copy()
    current = objective(w)
    for _ in range(iterations):
        q = 0.5 * (1.0 + np.tanh(0.5 * (x @ w)))  # the sigmoid, overflow-free
        grad = x.T @ (q - y) + lam * w
        hess = (x * (q * (1 - q))[:, None]).T @ x + np.diag(lam) + 1e-6 * np.eye(d)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-10 and objective(w - t * step) > current:
            t *= 0.5
        w = w - t * step
        current = objective(w)
        if np.abs(t * step).max() < 1e-9:
            break
    return w
