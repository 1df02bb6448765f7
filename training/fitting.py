"""What training fits and the engine applies: logistic and Platt fits, and the choice of thresholds.

Each function takes rows of ``python -m training.evaluate`` (one per case, see ``evaluate.case_row``) or arrays,
and returns numbers for a card field; ``python -m training.fit`` writes them into a bundle.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from umlcore.fusion import stacking_features

__all__ = ["fit_logistic", "fit_platt", "fit_stacking", "COMPONENT_THRESHOLDS", "CHECK_THRESHOLDS",
           "components_dice", "choose_component_threshold", "choose_check_threshold", "suggest_review_uncertainty"]

#: The ``component_max_uncertainty`` values ``choose_component_threshold`` tries.
COMPONENT_THRESHOLDS = (0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3)
#: The reader check's ``segmentation_min_lesion`` values ``choose_check_threshold`` tries.
CHECK_THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
#: The stacked rule's L2 penalty on every coefficient but the intercept (the shipped fit's).
STACKING_L2 = 0.001


def fit_logistic(features: np.ndarray, labels: np.ndarray, penalty: Optional[np.ndarray] = None,
                 start: Optional[np.ndarray] = None, iterations: int = 200) -> np.ndarray:
    """The weights ``w`` minimising ``sum NLL(sigmoid(features @ w), labels) + sum(penalty * w**2) / 2``.

    Newton steps with a backtracking line search (a step is halved until the objective does not rise; plain Newton
    steps diverge from the identity start when some logits are large), from ``start`` (default zeros), until a step
    moves no weight by 1e-9.

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


def fit_platt(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` minimising the NLL of ``sigmoid(slope * logit(p) + intercept)`` (the card's
    ``case_calibration`` / ``single_volume_calibration``).

    Raises:
        ValueError: shapes differ, or one class is missing.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-6, 1 - 1e-6)
    y = np.asarray(labels, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 1 or len(np.unique(y)) < 2:
        raise ValueError("fit_platt needs (N,) probabilities and (N,) labels with both classes present")
    w = fit_logistic(np.stack([np.log(p / (1 - p)), np.ones_like(p)], axis=1), y, start=np.array([1.0, 0.0]))
    return float(w[0]), float(w[1])


def fit_stacking(network_p: Sequence[float], reader_p: Sequence[Optional[Sequence[float]]],
                 labels: Sequence[int]) -> np.ndarray:
    """The coefficients of :func:`umlcore.fusion.stack_reader_opinion` (in :data:`umlcore.card.STACKING_TERMS`
    order): a logistic regression of ``labels`` on :func:`umlcore.fusion.stacking_features` of each case (the
    network's probability and the most suspicious lesion's reader probabilities, ``None`` where nothing was read),
    with an L2 penalty of :data:`STACKING_L2` on every coefficient but the intercept."""
    x = np.stack([stacking_features(n, None if r is None else np.asarray(r)) for n, r in zip(network_p, reader_p)])
    y = np.asarray(labels, dtype=np.float64)
    if len(np.unique(y)) < 2:
        raise ValueError("fit_stacking needs cases of both classes")
    return fit_logistic(x, y, penalty=np.r_[0.0, np.full(x.shape[1] - 1, STACKING_L2)])


def components_dice(rows: Sequence[dict], keep: Callable[[int, dict], bool]) -> float:
    """Mean Dice over the rows with a lesion of the labelmap made of the network's components that ``keep(rank,
    component)`` keeps (components are disjoint, so the Dice follows from each component's ``voxels`` and
    ``inside``, its voxels in the true mask); NaN without such rows."""
    dices = []
    for r in rows:
        if r["lesion_voxels"]:
            kept = [c for i, c in enumerate(r["components"]) if keep(i, c)]
            dices.append(2 * sum(c["inside"] for c in kept) / (sum(c["voxels"] for c in kept) + r["lesion_voxels"]))
    return float(np.mean(dices)) if dices else float("nan")


def choose_component_threshold(rows: Sequence[dict]) -> tuple[Optional[float], dict[str, float]]:
    """The ``component_max_uncertainty`` (of :data:`COMPONENT_THRESHOLDS`) with the best mean Dice of the rows'
    lesion cases, ``None`` when none beats keeping every component; and the mean Dice of each candidate."""
    table = {"none": components_dice(rows, lambda i, c: True)}
    table.update({str(t): components_dice(rows, lambda i, c, t=t: c["mean_uncertainty"] <= t)
                  for t in COMPONENT_THRESHOLDS})
    best = max(COMPONENT_THRESHOLDS, key=lambda t: table[str(t)])
    return (best if table[str(best)] > table["none"] else None), table


def choose_check_threshold(rows: Sequence[dict]) -> tuple[float, dict[str, float]]:
    """The reader check's ``segmentation_min_lesion`` (of :data:`CHECK_THRESHOLDS`) with the best mean Dice of the
    rows' lesion cases (a component stays when the reader read it, ``p_lesion`` not null, at least this sure); and
    the mean Dice of each candidate, of the network's every component, and of its true components (the ceiling)."""
    table = {str(t): components_dice(rows, lambda i, c, t=t: c["p_lesion"] is not None and c["p_lesion"] >= t)
             for t in CHECK_THRESHOLDS}
    best = max(CHECK_THRESHOLDS, key=lambda t: table[str(t)])
    table["every component"] = components_dice(rows, lambda i, c: True)
    table["true components (oracle)"] = components_dice(rows, lambda i, c: c["inside"] > 0)
    return best, table


def suggest_review_uncertainty(u: np.ndarray, correct: np.ndarray) -> float:
    """The case uncertainty above which cases are flagged "review": the smallest threshold whose retained
    (``u <= t``) cases reach the error rate of the surest half, so "reliable" means measurably safer."""
    u, correct = np.asarray(u, dtype=float), np.asarray(correct, dtype=int)
    order = np.argsort(u)
    errs = 1 - correct[order]
    half = max(1, len(u) // 2)
    target = errs[:half].mean()
    best = float(np.quantile(u, 0.9))
    for k in range(len(u), half - 1, -1):
        if errs[:k].mean() <= target + 1e-9:
            best = float(u[order][k - 1])
            break
    return round(best, 4)
