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

import numpy as np

__all__ = ["FUSION_RULE", "fuse_slice_opinions"]

#: Name of the rule, as written into the case summary (``classification.fusion``).
FUSION_RULE = "lesion-weighted evidence pooling"


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
