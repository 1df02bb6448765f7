"""Evaluation metrics: segmentation overlap and surface distance, classification, calibration, uncertainty.

Everything takes numpy arrays (anything ``np.asarray`` accepts) and returns plain Python floats (or dicts of
numpy arrays for curves). Shapes and values are validated up front; a bad argument raises
:class:`~umlcore.errors.UMLInputError` (a ``ValueError``) naming the problem and the fix.

Conventions
-----------
- Segmentation arrays are label maps (integer or bool) of one shape; ``label`` selects the structure.
- Classification ``probs`` are either ``(N, K)`` class probabilities (rows sum to 1) or ``(N,)`` probabilities
  of the positive class of a binary problem (class 1), which are read as ``(N, 2) = [1 - p, p]``.
- ``labels`` are integer class indices ``(N,)`` in ``[0, K)``.
- Undefined values are ``nan`` (e.g. AUROC when only one class is present), never an exception, so that an
  evaluation of a small fold still completes; the docstring of each function says when.

matplotlib is only imported inside :func:`plot_reliability_diagram`; scipy only inside :func:`hd95` and
:func:`assd`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np

from .errors import UMLInputError

__all__ = [
    "dice",
    "hd95",
    "assd",
    "accuracy",
    "balanced_accuracy",
    "confusion_matrix",
    "cohen_kappa",
    "sensitivity",
    "specificity",
    "f1_score",
    "roc_auc",
    "expected_calibration_error",
    "brier_score",
    "nll",
    "reliability_diagram",
    "plot_reliability_diagram",
    "uncertainty_error_auroc",
    "histogram_auroc",
    "uncertainty_error_counts",
    "risk_coverage",
]

ArrayLike = Union[np.ndarray, Sequence]


# --------------------------------------------------------------------------------------------------------------
# validation helpers


def _label_maps(pred: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise UMLInputError(
            f"pred and target must have the same shape, got {pred.shape} and {target.shape}; "
            "resample the prediction onto the reference grid first"
        )
    if pred.ndim == 0 or pred.size == 0:
        raise UMLInputError(f"pred and target must be non-empty label maps, got shape {pred.shape}")
    for name, arr in (("pred", pred), ("target", target)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise UMLInputError(
                f"{name} must be an integer or boolean label map, got dtype {arr.dtype}; "
                "threshold / argmax probabilities first (e.g. probs.argmax(0).astype(np.uint8))"
            )
    return pred, target


def _probs_labels(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(N, K)`` float64 probabilities and ``(N,)`` int64 labels."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    elif p.ndim != 2:
        raise UMLInputError(
            f"probs must be (N, K) class probabilities or (N,) positive-class probabilities, got shape {p.shape}"
        )
    n, k = p.shape
    if n == 0:
        raise UMLInputError("probs is empty: evaluate at least one sample")
    if k < 2:
        raise UMLInputError(f"probs needs >= 2 classes, got shape {p.shape}; pass (N,) for a binary problem")
    if y.shape != (n,):
        raise UMLInputError(f"labels must have shape ({n},) to match probs {p.shape}, got {y.shape}")
    if not np.all(np.isfinite(p)):
        raise UMLInputError("probs contains nan or inf; check the model output")
    if p.min() < -1e-6 or p.max() > 1 + 1e-6:
        raise UMLInputError(
            f"probs must lie in [0, 1], got range [{p.min():.4g}, {p.max():.4g}]; apply softmax or alpha / S first"
        )
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise UMLInputError("each row of probs must sum to 1 (within 1e-3); normalise the probabilities first")
    y = _int_labels(y, "labels")
    if y.min() < 0 or y.max() >= k:
        raise UMLInputError(f"labels must be class indices in [0, {k}), got range [{y.min()}, {y.max()}]")
    return np.clip(p, 0.0, 1.0), y


def _int_labels(y: np.ndarray, name: str) -> np.ndarray:
    if y.dtype == bool:
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    raise UMLInputError(f"{name} must hold integer class indices, got dtype {y.dtype} with non-integer values")


def _binary_vector(x: ArrayLike, name: str, n: Optional[int] = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 and n is None:
        arr = arr.reshape(-1)
    if n is not None and arr.shape != (n,):
        raise UMLInputError(f"{name} must have shape ({n},), got {arr.shape}")
    arr = _int_labels(arr, name)
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise UMLInputError(f"{name} must be binary (0/1 or bool), got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(bool)


def _check_bins(n_bins: int) -> None:
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise UMLInputError(f"n_bins must be a positive integer, got {n_bins!r}")


# --------------------------------------------------------------------------------------------------------------
# segmentation


def dice(pred: ArrayLike, target: ArrayLike, label: int = 1) -> float:
    """Dice similarity coefficient ``2 |P & T| / (|P| + |T|)`` of one label.

    Args:
        pred: Predicted label map, any shape (e.g. ``(Z, Y, X)`` or ``(H, W)``), integer or bool.
        target: Reference label map of the same shape.
        label: The structure to compare (``pred == label`` vs ``target == label``).

    Returns:
        Dice in ``[0, 1]``; ``1.0`` when the label is absent from both (nothing to find, nothing found).
    """
    pred, target = _label_maps(pred, target)
    p = pred == label
    t = target == label
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(p, t).sum() / denom)


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)
    return mask & ~eroded


def _surface_distances(
    pred: ArrayLike,
    target: ArrayLike,
    spacing: Optional[Sequence[float]],
    label: int,
    spacing_order: str,
) -> Union[float, tuple[np.ndarray, np.ndarray]]:
    """The distances (mm) of ``pred``'s surface voxels to ``target``'s surface and back, for :func:`hd95` and
    :func:`assd`; ``0.0`` when the label is absent from both masks, ``inf`` when it is present in exactly one."""
    pred, target = _label_maps(pred, target)
    ndim = pred.ndim
    if spacing is None:
        sampling = np.ones(ndim)
    else:
        sampling = np.asarray(spacing, dtype=np.float64).reshape(-1)
        if sampling.shape != (ndim,):
            raise UMLInputError(
                f"spacing must have one value per dimension of the masks ({ndim}), got {tuple(sampling)}"
            )
        if not np.all(np.isfinite(sampling)) or np.any(sampling <= 0):
            raise UMLInputError(f"spacing values must be positive, got {tuple(sampling)}")
        if spacing_order == "xyz":
            sampling = sampling[::-1].copy()
        elif spacing_order != "array":
            raise UMLInputError(f"spacing_order must be 'xyz' or 'array', got {spacing_order!r}")

    p = pred == label
    t = target == label
    has_p, has_t = bool(p.any()), bool(t.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return math.inf
    try:
        from scipy import ndimage
    except ImportError as exc:  # pragma: no cover - scipy is a dependency
        raise UMLInputError("hd95 and assd need scipy: pip install scipy") from exc

    # only the box around both masks (one voxel more, where the array has it) matters: the surfaces and every
    # distance between them are the same in it, and a small lesion in a large volume costs a small box
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(p | t))
    p, t = p[box], t[box]
    sp, st = _surface(p), _surface(t)
    dist_to_t = ndimage.distance_transform_edt(~st, sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=sampling)
    return dist_to_t[sp], dist_to_p[st]


def hd95(
    pred: ArrayLike,
    target: ArrayLike,
    spacing: Optional[Sequence[float]] = None,
    label: int = 1,
    spacing_order: Literal["xyz", "array"] = "xyz",
) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two masks, in mm.

    Surface voxels are the mask voxels with a face-neighbour outside the mask (the array border counts as
    outside). For each surface voxel of one mask the Euclidean distance (scipy's exact distance transform with
    the voxel spacing) to the nearest surface voxel of the other is taken; the result is
    ``max(P95(d(pred -> target)), P95(d(target -> pred)))`` (the medpy / MONAI convention), percentiles with
    numpy's linear interpolation.

    Args:
        pred: Predicted label map, ``(Z, Y, X)`` or ``(H, W)`` (any number of dimensions), integer or bool.
        target: Reference label map of the same shape.
        spacing: Voxel size in mm, one value per dimension; ``None`` means 1 mm everywhere.
        label: The structure to compare.
        spacing_order: ``"xyz"`` (default): ``spacing`` is in SimpleITK / ITK order ``(x, y, z)``, i.e. the
            *reverse* of the numpy axes of a ``GetArrayFromImage`` array ``(z, y, x)`` — pass ``case.spacing`` or
            ``image.GetSpacing()`` as is. ``"array"``: ``spacing`` follows the numpy axes of ``pred``.

    Returns:
        HD95 in mm. ``0.0`` when the label is absent from both masks; ``inf`` when it is present in exactly one
        (no surface to measure to: report such cases separately rather than averaging them).
    """
    d = _surface_distances(pred, target, spacing, label, spacing_order)
    if isinstance(d, float):
        return d
    d_pt, d_tp = d
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def assd(
    pred: ArrayLike,
    target: ArrayLike,
    spacing: Optional[Sequence[float]] = None,
    label: int = 1,
    spacing_order: Literal["xyz", "array"] = "xyz",
) -> float:
    """Average symmetric surface distance between two masks, in mm (the UML paper's ASSD, medpy's ``assd``).

    Surfaces and distances as in :func:`hd95`: the mean distance of ``pred``'s surface voxels to ``target``'s
    surface, the mean distance of ``target``'s surface voxels to ``pred``'s, and the result the mean of those two
    means, ``(mean d(pred -> target) + mean d(target -> pred)) / 2`` (medpy's convention, which the official UML code
    uses; it weighs both directions equally however many surface voxels each mask has).

    Args:
        pred: Predicted label map, ``(Z, Y, X)`` or ``(H, W)`` (any number of dimensions), integer or bool.
        target: Reference label map of the same shape.
        spacing: Voxel size in mm, one value per dimension; ``None`` means 1 mm everywhere (pixel units).
        label: The structure to compare.
        spacing_order: ``"xyz"`` (default, ITK order: pass ``case.spacing`` or ``image.GetSpacing()`` as is) or
            ``"array"`` (the numpy axes of ``pred``), as for :func:`hd95`.

    Returns:
        ASSD in mm. ``0.0`` when the label is absent from both masks; ``inf`` when it is present in exactly one
        (report such cases separately rather than averaging them).
    """
    d = _surface_distances(pred, target, spacing, label, spacing_order)
    if isinstance(d, float):
        return d
    d_pt, d_tp = d
    return float((d_pt.mean() + d_tp.mean()) / 2.0)


# --------------------------------------------------------------------------------------------------------------
# classification


def _predict(p: np.ndarray, threshold: float) -> np.ndarray:
    if p.shape[1] == 2:
        return (p[:, 1] >= threshold).astype(np.int64)
    return p.argmax(axis=1)


def _check_threshold(threshold: float) -> None:
    if not (0.0 <= float(threshold) <= 1.0):
        raise UMLInputError(f"threshold must lie in [0, 1], got {threshold}")


def accuracy(probs: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> float:
    """Fraction of samples whose predicted class equals the label.

    Args:
        probs: ``(N, K)`` probabilities (prediction = argmax) or ``(N,)`` positive-class probabilities.
        labels: ``(N,)`` class indices.
        threshold: For binary problems (``(N,)`` or ``K == 2``): predict class 1 when ``p_1 >= threshold``.

    Returns:
        Accuracy in ``[0, 1]``.
    """
    _check_threshold(threshold)
    p, y = _probs_labels(probs, labels)
    return float(np.mean(_predict(p, threshold) == y))


def balanced_accuracy(probs: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> float:
    """Mean per-class recall over the classes present in ``labels`` (robust to class imbalance).

    Args:
        probs: ``(N, K)`` or ``(N,)`` probabilities, as for :func:`accuracy`.
        labels: ``(N,)`` class indices.
        threshold: Binary decision threshold, as for :func:`accuracy`.

    Returns:
        Balanced accuracy in ``[0, 1]``.
    """
    _check_threshold(threshold)
    p, y = _probs_labels(probs, labels)
    pred = _predict(p, threshold)
    recalls = [np.mean(pred[y == c] == c) for c in np.unique(y)]
    return float(np.mean(recalls))


def confusion_matrix(probs: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> np.ndarray:
    """Counts of (true class, predicted class) pairs.

    Args:
        probs: ``(N, K)`` probabilities (prediction = argmax) or ``(N,)`` positive-class probabilities.
        labels: ``(N,)`` class indices.
        threshold: For binary problems (``(N,)`` or ``K == 2``): predict class 1 when ``p_1 >= threshold``.

    Returns:
        ``(K, K)`` int64 array, row = true class, column = predicted class (``K = 2`` for ``(N,)`` probabilities).
    """
    _check_threshold(threshold)
    p, y = _probs_labels(probs, labels)
    k = p.shape[1]
    return np.bincount(y * k + _predict(p, threshold), minlength=k * k).reshape(k, k).astype(np.int64)


def cohen_kappa(probs: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> float:
    """Cohen's kappa between the predicted classes and the labels (unweighted, as sklearn's
    ``cohen_kappa_score``): ``(p_o - p_e) / (1 - p_e)`` with ``p_o`` the accuracy and ``p_e`` the agreement expected
    by chance from the marginal frequencies, ``sum_k (true_k / N) (predicted_k / N)``.

    Args:
        probs: ``(N, K)`` or ``(N,)`` probabilities, as for :func:`accuracy`.
        labels: ``(N,)`` class indices.
        threshold: Binary decision threshold, as for :func:`accuracy`.

    Returns:
        Kappa in ``[-1, 1]`` (1 = perfect agreement, 0 = chance); ``nan`` when chance agreement is already
        perfect (labels and predictions all of one and the same class).
    """
    cm = confusion_matrix(probs, labels, threshold).astype(np.float64)
    n = cm.sum()
    observed = np.trace(cm) / n
    expected = float((cm.sum(axis=1) * cm.sum(axis=0)).sum() / (n * n))
    if expected >= 1.0:
        return math.nan
    return float((observed - expected) / (1.0 - expected))


def _one_vs_rest(probs: ArrayLike, labels: ArrayLike, threshold: float, positive: int) -> tuple[int, int, int, int]:
    """``(tp, fp, fn, tn)`` of class ``positive`` against the others."""
    cm = confusion_matrix(probs, labels, threshold)
    if not 0 <= positive < cm.shape[0]:
        raise UMLInputError(f"positive must be a class index in [0, {cm.shape[0]}), got {positive}")
    tp = int(cm[positive, positive])
    fn = int(cm[positive].sum()) - tp
    fp = int(cm[:, positive].sum()) - tp
    return tp, fp, fn, int(cm.sum()) - tp - fp - fn


def sensitivity(probs: ArrayLike, labels: ArrayLike, threshold: float = 0.5, positive: int = 1) -> float:
    """Sensitivity (recall, true-positive rate) of class ``positive``: ``TP / (TP + FN)``.

    Args:
        probs: ``(N, K)`` or ``(N,)`` probabilities, as for :func:`accuracy`.
        labels: ``(N,)`` class indices.
        threshold: Binary decision threshold, as for :func:`accuracy`.
        positive: The class whose recall is measured (default class 1).

    Returns:
        Sensitivity in ``[0, 1]``; ``nan`` when no label is ``positive``.
    """
    tp, _, fn, _ = _one_vs_rest(probs, labels, threshold, positive)
    return float(tp / (tp + fn)) if tp + fn else math.nan


def specificity(probs: ArrayLike, labels: ArrayLike, threshold: float = 0.5, positive: int = 1) -> float:
    """Specificity (true-negative rate) with respect to class ``positive``: ``TN / (TN + FP)``, i.e. the fraction of
    the samples of every other class that are not predicted ``positive``.

    Args:
        probs: ``(N, K)`` or ``(N,)`` probabilities, as for :func:`accuracy`.
        labels: ``(N,)`` class indices.
        threshold: Binary decision threshold, as for :func:`accuracy`.
        positive: The positive class (default class 1).

    Returns:
        Specificity in ``[0, 1]``; ``nan`` when every label is ``positive``.
    """
    _, fp, _, tn = _one_vs_rest(probs, labels, threshold, positive)
    return float(tn / (tn + fp)) if tn + fp else math.nan


def f1_score(
    probs: ArrayLike,
    labels: ArrayLike,
    threshold: float = 0.5,
    average: Literal["binary", "macro", "weighted"] = "binary",
    positive: int = 1,
) -> float:
    """F1 score ``2 TP / (2 TP + FP + FN)`` (harmonic mean of precision and recall), as sklearn's ``f1_score``.

    Args:
        probs: ``(N, K)`` or ``(N,)`` probabilities, as for :func:`accuracy`.
        labels: ``(N,)`` class indices.
        threshold: Binary decision threshold, as for :func:`accuracy`.
        average: ``"binary"``: the F1 of class ``positive``; ``"macro"``: the unweighted mean of the per-class F1
            over the classes that occur in the labels or the predictions; ``"weighted"``: the mean of the per-class
            F1 weighted by each class's number of labels (the official UML code's ``average='weighted'``).
        positive: The class of ``average="binary"``.

    Returns:
        F1 in ``[0, 1]``; a class never labelled nor predicted has no F1 (``"binary"``: 0.0, as sklearn's default).
    """
    cm = confusion_matrix(probs, labels, threshold)
    tp = np.diag(cm).astype(np.float64)
    true, predicted = cm.sum(axis=1), cm.sum(axis=0)
    denom = true + predicted  # 2 TP + FP + FN
    per_class = np.divide(2.0 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    if average == "binary":
        if not 0 <= positive < cm.shape[0]:
            raise UMLInputError(f"positive must be a class index in [0, {cm.shape[0]}), got {positive}")
        return float(per_class[positive])
    if average == "macro":
        return float(per_class[denom > 0].mean())
    if average == "weighted":
        return float((per_class * true).sum() / true.sum())
    raise UMLInputError(f"average must be 'binary', 'macro' or 'weighted', got {average!r}")


def _rank_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC with average ranks (a tied positive/negative pair counts 0.5)."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average rank (1-based) of each run of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [scores.size]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    rank_sum = ranks[positive].sum()
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve, rank based (Mann-Whitney U); a tied positive/negative pair counts 0.5.

    Args:
        scores: ``(N,)`` scores, higher = more likely positive (e.g. ``p_1``), or ``(N, 2)`` probabilities
            (column 1 is used).
        labels: ``(N,)`` binary labels (0/1 or bool).

    Returns:
        AUROC in ``[0, 1]``; ``nan`` when ``labels`` holds only one class.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    if s.ndim != 1 or s.size == 0:
        raise UMLInputError(f"scores must be a non-empty (N,) vector or (N, 2) probabilities, got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise UMLInputError("scores contains nan or inf")
    y = _binary_vector(labels, "labels", n=s.size)
    return _rank_auc(s, y)


def _top_label(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    return conf, correct


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # bins (0, 1/n], (1/n, 2/n], ..., ((n-1)/n, 1]; a confidence of exactly 0 goes to the first bin
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def reliability_diagram(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict:
    """Top-label reliability statistics in ``n_bins`` equal-width confidence bins.

    The confidence of a sample is its largest class probability; it is correct when that class is the label.
    Bin ``b`` holds confidences in ``(b / n_bins, (b + 1) / n_bins]`` (a confidence of exactly 0 joins bin 0).

    Args:
        probs: ``(N, K)`` or ``(N,)`` probabilities.
        labels: ``(N,)`` class indices.
        n_bins: Number of bins.

    Returns:
        ``{"bin_edges": (n_bins + 1,), "confidence": (n_bins,) mean confidence per bin (nan if empty),
        "accuracy": (n_bins,) fraction correct per bin (nan if empty), "count": (n_bins,) int64,
        "ece": float}`` — numpy arrays (``.tolist()`` them for JSON).
    """
    _check_bins(n_bins)
    p, y = _probs_labels(probs, labels)
    conf, correct = _top_label(p, y)
    idx = _bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    corr_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        mean_acc = np.where(count > 0, corr_sum / np.maximum(count, 1), np.nan)
    ece = float(np.abs(corr_sum - conf_sum).sum() / conf.size)
    return {
        "bin_edges": np.linspace(0.0, 1.0, n_bins + 1),
        "confidence": mean_conf,
        "accuracy": mean_acc,
        "count": count,
        "ece": ece,
    }


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width bins: ``sum_b n_b / N * |acc_b - conf_b|``.

    Args:
        probs: ``(N, K)`` class probabilities or ``(N,)`` positive-class probabilities (binary; the top label
            is then class 1 when ``p >= 0.5``, else class 0 with confidence ``1 - p``).
        labels: ``(N,)`` class indices.
        n_bins: Number of bins over ``[0, 1]`` (see :func:`reliability_diagram` for the bin edges).

    Returns:
        ECE in ``[0, 1]``.
    """
    return reliability_diagram(probs, labels, n_bins)["ece"]


def brier_score(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean squared error of the probabilities against the one-hot labels.

    Args:
        probs: ``(N, K)``: the multi-class Brier score ``mean_n sum_k (p_nk - y_nk)^2`` (range ``[0, 2]``);
            ``(N,)`` positive-class probabilities: the binary Brier score ``mean_n (p_n - y_n)^2`` (range
            ``[0, 1]``, as in most binary literature; it is half the ``(N, 2)`` value).
        labels: ``(N,)`` class indices.

    Returns:
        The Brier score (lower is better).
    """
    binary = np.asarray(probs).ndim == 1
    p, y = _probs_labels(probs, labels)
    onehot = np.eye(p.shape[1])[y]
    per_sample = ((p - onehot) ** 2).sum(axis=1)
    if binary:
        per_sample = per_sample / 2.0
    return float(per_sample.mean())


def nll(probs: ArrayLike, labels: ArrayLike, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-mean_n log p_n[y_n]`` (natural log), probabilities clipped at ``eps``.

    Args:
        probs: ``(N, K)`` or ``(N,)`` probabilities.
        labels: ``(N,)`` class indices.
        eps: Lower clip of the probability of the true class (keeps the value finite).

    Returns:
        NLL in nats (lower is better).
    """
    p, y = _probs_labels(probs, labels)
    p_true = np.clip(p[np.arange(y.size), y], eps, 1.0)
    return float(-np.log(p_true).mean())


def plot_reliability_diagram(
    probs: ArrayLike,
    labels: ArrayLike,
    path: Union[str, Path],
    n_bins: int = 15,
    title: Optional[str] = None,
) -> Path:
    """Write a reliability diagram (accuracy vs confidence per bin, with the gap to the diagonal) as a PNG.

    matplotlib is imported here (Agg canvas, no pyplot state), so ``umlcore`` does not need it otherwise.

    Args:
        probs: ``(N, K)`` or ``(N,)`` probabilities.
        labels: ``(N,)`` class indices.
        path: Output ``.png`` file; its folder is created if needed.
        n_bins: Number of bins.
        title: Figure title; default ``"Reliability (ECE = ...)"``.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UMLInputError(f"plot_reliability_diagram writes PNG: give a path ending in .png, got {path}")
    stats = reliability_diagram(probs, labels, n_bins)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UMLInputError("plot_reliability_diagram needs matplotlib: pip install matplotlib") from exc

    edges = stats["bin_edges"]
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    filled = stats["count"] > 0
    fig = Figure(figsize=(4.5, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    ax.bar(centers[filled], stats["accuracy"][filled], width=width, color="#4477aa", edgecolor="black",
           linewidth=0.5, label="accuracy")
    gap_bottom = np.minimum(stats["accuracy"][filled], stats["confidence"][filled])
    gap_height = np.abs(stats["accuracy"][filled] - stats["confidence"][filled])
    ax.bar(centers[filled], gap_height, bottom=gap_bottom, width=width, color="#ee6677", alpha=0.5,
           edgecolor="#ee6677", linewidth=0.5, label="gap to confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title if title is not None else f"Reliability (ECE = {stats['ece']:.3f})")
    ax_count.bar(centers, stats["count"], width=width, color="grey", edgecolor="black", linewidth=0.5)
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("count")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------------------------------------------
# uncertainty


def uncertainty_error_auroc(
    uncertainty: ArrayLike,
    error_mask: ArrayLike,
    max_samples: int = 2_000_000,
    seed: int = 0,
) -> float:
    """AUROC of the per-voxel uncertainty as a detector of wrongly segmented voxels.

    0.5 = the uncertainty says nothing about where the mask is wrong; 1.0 = every wrong voxel is more
    uncertain than every right one.

    Args:
        uncertainty: Per-voxel uncertainty, any shape (e.g. ``(Z, Y, X)``), higher = less trustworthy.
        error_mask: Same shape; true where the predicted label differs from the reference
            (``pred != target``).
        max_samples: When there are more voxels than this, a fixed random subset of this size (drawn with
            ``seed``, so the result is deterministic) is used.
        seed: Seed of the subsampling.

    Returns:
        AUROC in ``[0, 1]``; ``nan`` when every voxel is right (or every voxel is wrong).
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    e = np.asarray(error_mask)
    if u.shape != e.shape:
        raise UMLInputError(f"uncertainty and error_mask must have the same shape, got {u.shape} and {e.shape}")
    if u.size == 0:
        raise UMLInputError("uncertainty is empty")
    if not isinstance(max_samples, (int, np.integer)) or max_samples < 2:
        raise UMLInputError(f"max_samples must be an integer >= 2, got {max_samples!r}")
    u = u.reshape(-1)
    e = _binary_vector(e.reshape(-1), "error_mask", n=u.size)
    if not np.all(np.isfinite(u)):
        raise UMLInputError("uncertainty contains nan or inf")
    if u.size > max_samples:
        idx = np.sort(np.random.default_rng(seed).choice(u.size, size=max_samples, replace=False))
        u, e = u[idx], e[idx]
    return _rank_auc(u, e)


UNCERTAINTY_BINS = 1 << 16


def uncertainty_error_counts(
    uncertainty: ArrayLike,
    error_mask: ArrayLike,
    bins: int = UNCERTAINTY_BINS,
) -> np.ndarray:
    """Per-bin counts of the wrong and the right voxels' uncertainty, for :func:`histogram_auroc`.

    Counts of many volumes add up, so the uncertainty-error AUROC of a whole test set is exact over every voxel
    (up to ties within a bin) without keeping the voxels; a voxel subsample of it moved by several hundredths.

    Args:
        uncertainty: Per-voxel evidential uncertainty ``K / S`` in ``[0, 1]``, any shape.
        error_mask: Same shape; true where the predicted label is wrong.
        bins: Equal-width bins over ``[0, 1]``.

    Returns:
        ``(2, bins)`` int64: row 0 the wrong voxels' counts, row 1 the right ones'.
    """
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    e = np.asarray(error_mask).reshape(-1)
    if u.size != e.size:
        raise UMLInputError(f"uncertainty and error_mask must have the same size, got {u.size} and {e.size}")
    if u.size and (not np.all(np.isfinite(u)) or u.min() < 0.0 or u.max() > 1.0):
        raise UMLInputError(f"uncertainty values must lie in [0, 1], got {np.nanmin(u)} .. {np.nanmax(u)}: pass an "
                            "evidential uncertainty (K / S)")
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise UMLInputError(f"bins must be a positive integer, got {bins!r}")
    e = _binary_vector(e, "error_mask", n=u.size)
    idx = np.minimum((u * bins).astype(np.int64), bins - 1)
    return np.stack([np.bincount(idx[e], minlength=bins), np.bincount(idx[~e], minlength=bins)])


def histogram_auroc(positive_counts: ArrayLike, negative_counts: ArrayLike) -> float:
    """AUROC of a score from per-bin counts of positives and negatives (bins in increasing score order).

    A pair in the same bin counts 0.5, as a tie does in :func:`roc_auc`, so with one bin per distinct score the
    result equals :func:`roc_auc` exactly. Counts of many volumes add up, so an AUROC over every voxel of a test set
    (``python -m training.evaluate``'s pixel uncertainty-error AUROC) needs two histograms, not the voxels.

    Args:
        positive_counts: ``(B,)`` how many positives (e.g. wrongly segmented voxels) fall in each score bin.
        negative_counts: ``(B,)`` the same for the negatives.

    Returns:
        AUROC in ``[0, 1]``; ``nan`` when either class has no count.
    """
    pos = np.asarray(positive_counts, dtype=np.float64)
    neg = np.asarray(negative_counts, dtype=np.float64)
    if pos.ndim != 1 or pos.shape != neg.shape or pos.size == 0:
        raise UMLInputError(f"positive_counts and negative_counts must be non-empty (B,) vectors of one length, got "
                            f"{pos.shape} and {neg.shape}")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))) or pos.min() < 0 or neg.min() < 0:
        raise UMLInputError("counts must be finite and >= 0")
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.cumsum(neg) - neg  # negatives in lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def risk_coverage(
    score: ArrayLike,
    correct: ArrayLike,
    kind: Literal["confidence", "uncertainty"] = "confidence",
) -> dict:
    """Risk-coverage curve of selective prediction and its area (AURC).

    Samples are accepted from the most to the least trustworthy (highest confidence / lowest uncertainty).
    At each distinct score threshold the coverage is the accepted fraction and the selective risk the error
    rate among the accepted; tied scores are accepted together. AURC is the step integral
    ``sum_j (coverage_j - coverage_{j-1}) * risk_j`` (without ties: the mean of the risk after each accepted
    sample). ``optimal_aurc`` is the AURC of a perfect ranking (all correct samples first) and
    ``eaurc = aurc - optimal_aurc`` the excess attributable to the score.

    Args:
        score: ``(N,)`` confidence (``kind="confidence"``, higher = more trustworthy) or uncertainty
            (``kind="uncertainty"``, lower = more trustworthy).
        correct: ``(N,)`` bool, true where the prediction is right.
        kind: How to read ``score``.

    Returns:
        ``{"coverage": (M,), "risk": (M,), "threshold": (M,), "aurc": float, "optimal_aurc": float,
        "eaurc": float}`` with ``M`` the number of distinct scores; coverage increasing to 1.
    """
    s = np.asarray(score, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise UMLInputError(f"score must be a non-empty (N,) vector, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise UMLInputError("score contains nan or inf")
    c = _binary_vector(correct, "correct", n=s.size)
    if kind == "confidence":
        trust = s
    elif kind == "uncertainty":
        trust = -s
    else:
        raise UMLInputError(f"kind must be 'confidence' or 'uncertainty', got {kind!r}")

    coverage, risk, threshold_trust = _rc_curve(trust, c)
    aurc = _step_area(coverage, risk)
    opt_cov, opt_risk, _ = _rc_curve(c.astype(np.float64), c)
    optimal = _step_area(opt_cov, opt_risk)
    threshold = threshold_trust if kind == "confidence" else -threshold_trust
    return {
        "coverage": coverage,
        "risk": risk,
        "threshold": threshold,
        "aurc": aurc,
        "optimal_aurc": optimal,
        "eaurc": aurc - optimal,
    }


def _rc_curve(trust: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-trust, kind="mergesort")
    t = trust[order]
    errors = np.cumsum(~correct[order])
    n = t.size
    # last index of each run of equal trust values
    ends = np.concatenate([np.flatnonzero(np.diff(t) != 0), [n - 1]])
    accepted = ends + 1
    return accepted / n, errors[ends] / accepted, t[ends]


def _step_area(coverage: np.ndarray, risk: np.ndarray) -> float:
    widths = np.diff(np.concatenate([[0.0], coverage]))
    return float((widths * risk).sum())
