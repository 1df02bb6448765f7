"""umlcore.metrics against hand-computed values on tiny arrays."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from umlcore import metrics as m
from umlcore.errors import UMLInputError


# ---------------------------------------------------------------------------------------------------- Dice


def test_dice_hand_values():
    pred = np.array([[1, 1, 0], [0, 0, 0]], dtype=np.uint8)
    target = np.array([[1, 0, 0], [1, 0, 0]], dtype=np.uint8)
    assert m.dice(pred, target) == pytest.approx(0.5)  # 2*1 / (2+2)
    assert m.dice(pred.astype(bool), target.astype(bool)) == pytest.approx(0.5)
    assert m.dice(target, target) == 1.0


def test_dice_selects_label_and_empty_cases():
    pred = np.array([0, 2, 2, 1, 1])
    target = np.array([0, 2, 1, 1, 2])
    assert m.dice(pred, target, label=2) == pytest.approx(2 * 1 / 4)
    assert m.dice(pred, target, label=1) == pytest.approx(2 * 1 / 4)
    zeros = np.zeros((4, 4), np.uint8)
    assert m.dice(zeros, zeros) == 1.0  # nothing to find, nothing found
    one = zeros.copy()
    one[0, 0] = 1
    assert m.dice(one, zeros) == 0.0


def test_dice_rejects_bad_input():
    with pytest.raises(UMLInputError, match="same shape"):
        m.dice(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(UMLInputError, match="integer or boolean"):
        m.dice(np.zeros((2, 2), float), np.zeros((2, 2), int))


# ---------------------------------------------------------------------------------------------------- HD95


def test_hd95_single_points_and_spacing_order():
    a = np.zeros((1, 11), np.uint8)
    b = np.zeros((1, 11), np.uint8)
    a[0, 0] = 1
    b[0, 3] = 1
    assert m.hd95(a, b) == pytest.approx(3.0)
    # a: {0}; b: {0, 10}: d(a->b) = [0]; d(b->a) = [0, 10] -> P95 = 9.5 (linear interpolation)
    b[0, 3] = 0
    b[0, 0] = b[0, 10] = 1
    assert m.hd95(a, b) == pytest.approx(9.5)
    assert m.hd95(b, a) == pytest.approx(9.5)
    # the difference lies along numpy axis 1 = x: ITK-order spacing (x=2, y=1) doubles it
    assert m.hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(19.0)
    assert m.hd95(a, b, spacing=(1.0, 2.0)) == pytest.approx(9.5)
    assert m.hd95(a, b, spacing=(1.0, 2.0), spacing_order="array") == pytest.approx(19.0)


def test_hd95_anisotropic_volume():
    a = np.zeros((3, 4, 4), np.uint8)
    b = np.zeros((3, 4, 4), np.uint8)
    a[0, 1, 1] = 1
    b[2, 1, 1] = 1
    # two slices apart along z; spacing given (x, y, z)
    assert m.hd95(a, b, spacing=(0.5, 0.5, 3.0)) == pytest.approx(6.0)


def test_hd95_shifted_square():
    a = np.zeros((7, 7), np.uint8)
    b = np.zeros((7, 7), np.uint8)
    a[2:5, 1:4] = 1
    b[2:5, 2:5] = 1
    # surfaces are the 8 border pixels of each square; distances [0,0,0,0,1,1,1,1] both ways -> P95 = 1
    assert m.hd95(a, b) == pytest.approx(1.0)
    assert m.hd95(a, a) == 0.0


def test_hd95_empty_cases_and_errors():
    zeros = np.zeros((5, 5), np.uint8)
    one = zeros.copy()
    one[2, 2] = 1
    assert m.hd95(zeros, zeros) == 0.0
    assert m.hd95(one, zeros) == math.inf
    assert m.hd95(zeros, one) == math.inf
    with pytest.raises(UMLInputError, match="one value per dimension"):
        m.hd95(one, one, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(UMLInputError, match="positive"):
        m.hd95(one, one, spacing=(1.0, 0.0))


# ---------------------------------------------------------------------------------------------------- classification

P2 = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]])
Y2 = np.array([0, 1, 0, 0])


def test_accuracy_and_balanced_accuracy_binary():
    assert m.accuracy(P2, Y2) == pytest.approx(0.75)
    assert m.accuracy(P2[:, 1], Y2) == pytest.approx(0.75)  # (N,) positive-class form
    assert m.accuracy(P2[:, 1], Y2, threshold=0.65) == pytest.approx(0.5)
    # recall class 0 = 2/3, class 1 = 1
    assert m.balanced_accuracy(P2, Y2) == pytest.approx(5 / 6)
    assert m.balanced_accuracy(P2[:, 1], Y2) == pytest.approx(5 / 6)


def test_accuracy_multiclass():
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    y = np.array([0, 2, 2])
    assert m.accuracy(p, y) == pytest.approx(2 / 3)
    assert m.balanced_accuracy(p, y) == pytest.approx((1.0 + 0.5) / 2)


def test_roc_auc_hand_values_and_ties():
    assert m.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # one tied positive/negative pair counts 0.5: (0.5 + 1 + 2) / 4
    assert m.roc_auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert m.roc_auc([0.3, 0.3, 0.3, 0.3], [0, 1, 0, 1]) == pytest.approx(0.5)
    assert m.roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert m.roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert m.roc_auc(P2, Y2) == pytest.approx(m.roc_auc(P2[:, 1], Y2))  # (N, 2) uses column 1
    assert math.isnan(m.roc_auc([0.1, 0.9], [1, 1]))


def test_roc_auc_matches_pair_counting():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=60) / 5.0  # many ties
    labels = rng.integers(0, 2, size=60)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert m.roc_auc(scores, labels) == pytest.approx(pairs / (pos.size * neg.size))


def test_classification_input_validation():
    with pytest.raises(UMLInputError, match="sum to 1"):
        m.accuracy([[0.5, 0.6]], [0])
    with pytest.raises(UMLInputError, match=r"in \[0, 2\)"):
        m.accuracy(P2, [0, 1, 2, 0])
    with pytest.raises(UMLInputError, match="shape"):
        m.accuracy(P2, [0, 1])
    with pytest.raises(UMLInputError, match="nan"):
        m.nll([np.nan, 0.5], [0, 1])
    with pytest.raises(UMLInputError, match=r"\[0, 1\]"):
        m.brier_score([1.5, 0.5], [0, 1])
    with pytest.raises(UMLInputError, match="binary"):
        m.roc_auc([0.1, 0.2], [0, 2])


# ---------------------------------------------------------------------------------------------------- calibration

# top-label confidences .9 (right), .85 (wrong), .7 (right), .55 (right)
PC = np.array([[0.1, 0.9], [0.15, 0.85], [0.7, 0.3], [0.45, 0.55]])
YC = np.array([1, 0, 0, 1])


def test_reliability_diagram_and_ece_hand_values():
    rd = m.reliability_diagram(PC, YC, n_bins=5)
    np.testing.assert_allclose(rd["bin_edges"], [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_array_equal(rd["count"], [0, 0, 1, 1, 2])
    np.testing.assert_allclose(rd["confidence"], [np.nan, np.nan, 0.55, 0.7, 0.875])
    np.testing.assert_allclose(rd["accuracy"], [np.nan, np.nan, 1.0, 1.0, 0.5])
    # 1/4 * .45 + 1/4 * .3 + 2/4 * .375
    assert rd["ece"] == pytest.approx(0.375)
    assert m.expected_calibration_error(PC, YC, n_bins=5) == pytest.approx(0.375)
    # (N,) positive-class form gives the same top-label statistics
    assert m.expected_calibration_error(PC[:, 1], YC, n_bins=5) == pytest.approx(0.375)
    # one bin: |mean accuracy - mean confidence| = |0.75 - 0.75|
    assert m.expected_calibration_error(PC, YC, n_bins=1) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(UMLInputError, match="n_bins"):
        m.reliability_diagram(PC, YC, n_bins=0)


def test_brier_and_nll_hand_values():
    p = np.array([0.9, 0.2])
    y = np.array([1, 1])
    assert m.brier_score(p, y) == pytest.approx((0.01 + 0.64) / 2)
    assert m.brier_score(np.stack([1 - p, p], 1), y) == pytest.approx(0.65)  # multi-class form sums both columns
    assert m.brier_score([[0.7, 0.2, 0.1]], [0]) == pytest.approx(0.09 + 0.04 + 0.01)
    assert m.nll(p, y) == pytest.approx(-(math.log(0.9) + math.log(0.2)) / 2)
    assert m.nll([[0.0, 1.0]], [0]) == pytest.approx(-math.log(1e-12))  # clipped, finite


def test_plot_reliability_diagram_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.random(200)
    y = (rng.random(200) < p).astype(int)
    out = m.plot_reliability_diagram(p, y, tmp_path / "sub" / "rel.png", n_bins=10)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    with pytest.raises(UMLInputError, match=".png"):
        m.plot_reliability_diagram(p, y, tmp_path / "rel.pdf")


def test_import_umlcore_metrics_does_not_import_matplotlib():
    code = "import sys, umlcore.metrics; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------------------------------- uncertainty


def test_uncertainty_error_auroc_hand_values():
    assert m.uncertainty_error_auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert m.uncertainty_error_auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    u = np.array([[0.1, 0.5], [0.5, 0.9]])
    err = np.array([[False, True], [False, True]])
    assert m.uncertainty_error_auroc(u, err) == pytest.approx(0.875)
    assert math.isnan(m.uncertainty_error_auroc(u, np.zeros_like(err)))
    with pytest.raises(UMLInputError, match="same shape"):
        m.uncertainty_error_auroc(u, err[0])


def test_uncertainty_error_auroc_subsampling_is_deterministic():
    rng = np.random.default_rng(1)
    err = rng.random((40, 50, 50)) < 0.1
    u = np.where(err, rng.random(err.shape) * 0.6 + 0.4, rng.random(err.shape) * 0.6)
    full = m.uncertainty_error_auroc(u, err)
    a = m.uncertainty_error_auroc(u, err, max_samples=5000)
    b = m.uncertainty_error_auroc(u, err, max_samples=5000)
    assert a == b
    assert abs(a - full) < 0.03
    assert m.uncertainty_error_auroc(u, err, max_samples=5000, seed=1) != a


def test_histogram_auroc_equals_the_rank_auroc_with_ties():
    # the hand case above as counts: bins 0.1, 0.5, 0.9; errors at 0.5 and 0.9, right voxels at 0.1 and 0.5
    assert m.histogram_auroc([0, 1, 1], [1, 1, 0]) == pytest.approx(0.875)
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 7, size=500)  # many ties
    labels = rng.random(500) < 0.3 + 0.08 * scores
    pos = np.bincount(scores[labels], minlength=7)
    neg = np.bincount(scores[~labels], minlength=7)
    assert m.histogram_auroc(pos, neg) == pytest.approx(m.roc_auc(scores.astype(float), labels), abs=1e-12)
    assert math.isnan(m.histogram_auroc([0, 0], [3, 1]))
    with pytest.raises(UMLInputError, match="one length"):
        m.histogram_auroc([1, 2], [1, 2, 3])
    with pytest.raises(UMLInputError, match=">= 0"):
        m.histogram_auroc([1, -2], [1, 2])


def test_uncertainty_error_counts_add_up_to_the_auroc_over_every_voxel():
    rng = np.random.default_rng(0)
    err = rng.random((3, 20, 20)) < 0.05
    u = np.where(err, rng.random(err.shape) * 0.7 + 0.3, rng.random(err.shape) * 0.7).astype(np.float32)
    u[0, 0, :2] = (0.0, 1.0)  # both ends of the range: first and last bin
    counts = m.uncertainty_error_counts(u, err)
    assert counts.shape == (2, m.UNCERTAINTY_BINS) and counts.sum() == u.size and counts[0].sum() == err.sum()
    assert counts[:, 0].sum() >= 1 and counts[:, -1].sum() >= 1
    # two "cases" counted apart and added give the counts of both together
    assert np.array_equal(m.uncertainty_error_counts(u[:1], err[:1]) + m.uncertainty_error_counts(u[1:], err[1:]),
                          counts)
    binned = np.minimum((u.astype(np.float64) * m.UNCERTAINTY_BINS).astype(int), m.UNCERTAINTY_BINS - 1)
    assert m.histogram_auroc(*counts) == pytest.approx(m.uncertainty_error_auroc(binned, err), abs=1e-12)
    assert m.histogram_auroc(*counts) == pytest.approx(m.uncertainty_error_auroc(u, err), abs=1e-3)
    assert m.histogram_auroc(*m.uncertainty_error_counts([0.1, 0.5, 0.5, 0.9], [0, 1, 0, 1], bins=10)) == 0.875
    with pytest.raises(UMLInputError, match=r"in \[0, 1\]"):
        m.uncertainty_error_counts([0.2, 1.5], [0, 1])
    with pytest.raises(UMLInputError, match="same size"):
        m.uncertainty_error_counts([0.2, 0.5], [0, 1, 1])


def test_risk_coverage_hand_values():
    rc = m.risk_coverage([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 1])
    np.testing.assert_allclose(rc["coverage"], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(rc["risk"], [0.0, 0.5, 1 / 3, 0.25])
    np.testing.assert_allclose(rc["threshold"], [0.9, 0.8, 0.7, 0.6])
    assert rc["aurc"] == pytest.approx((0 + 0.5 + 1 / 3 + 0.25) / 4)
    assert rc["optimal_aurc"] == pytest.approx(0.25 / 4)  # correct samples first: risks 0, 0, 0, 1/4
    assert rc["eaurc"] == pytest.approx(rc["aurc"] - rc["optimal_aurc"])
    ru = m.risk_coverage([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 1], kind="uncertainty")
    assert ru["aurc"] == pytest.approx(rc["aurc"])
    np.testing.assert_allclose(ru["threshold"], [0.1, 0.2, 0.3, 0.4])


def test_risk_coverage_ties_are_accepted_together():
    a = m.risk_coverage([0.9, 0.9, 0.5], [1, 0, 1])
    b = m.risk_coverage([0.9, 0.9, 0.5], [0, 1, 1])
    np.testing.assert_allclose(a["coverage"], [2 / 3, 1.0])
    np.testing.assert_allclose(a["risk"], [0.5, 1 / 3])
    assert a["aurc"] == pytest.approx(2 / 3 * 0.5 + 1 / 3 * 1 / 3)
    assert b["aurc"] == a["aurc"]
    with pytest.raises(UMLInputError, match="kind"):
        m.risk_coverage([0.5], [1], kind="margin")


# ---------------------------------------------------------------------------------------------------- ASSD


def test_assd_is_the_mean_of_the_two_directed_mean_surface_distances():
    a = np.zeros((1, 11), np.uint8)
    b = np.zeros((1, 11), np.uint8)
    a[0, 0] = 1
    b[0, 0] = b[0, 10] = 1
    # d(a -> b) = [0] (mean 0); d(b -> a) = [0, 10] (mean 5): ASSD = (0 + 5) / 2 = 2.5 (HD95 9.5)
    assert m.assd(a, b) == pytest.approx(2.5)
    assert m.assd(b, a) == pytest.approx(2.5)
    assert m.assd(a, b, spacing=(2.0, 1.0)) == pytest.approx(5.0)  # ITK order: x is numpy axis 1
    assert m.assd(a, b, spacing=(1.0, 2.0)) == pytest.approx(2.5)
    assert m.assd(a, b, spacing=(2.0, 1.0), spacing_order="array") == pytest.approx(2.5)


def test_assd_of_shifted_squares_and_slices():
    a = np.zeros((7, 7), np.uint8)
    b = np.zeros((7, 7), np.uint8)
    a[2:5, 1:4] = 1
    b[2:5, 2:5] = 1
    # 8 border pixels each; 4 of them lie on the other's border, 4 one pixel off: mean 0.5 both ways
    assert m.assd(a, b) == pytest.approx(0.5)
    # x spacing 3: the three pixels of a's left column are 3 mm from b's; a's centre-right pixel (3, 3) lies 1 mm
    # (one row, y) from b's top pixel (2, 3): (3 + 3 + 3 + 1) / 8 = 1.25 each way
    assert m.assd(a, b, spacing=(3.0, 1.0)) == pytest.approx(1.25)
    v = np.zeros((3, 4, 4), np.uint8)
    w = np.zeros((3, 4, 4), np.uint8)
    v[0, 1, 1] = 1
    w[2, 1, 1] = 1
    assert m.assd(v, w, spacing=(0.5, 0.5, 3.0)) == pytest.approx(6.0)  # two slices of 3 mm apart
    assert m.assd(a, a) == 0.0


def test_assd_selects_label_and_empty_cases():
    pred = np.array([[0, 2, 2, 0, 1]])
    target = np.array([[0, 0, 2, 2, 1]])
    # label 2: {1, 2} vs {2, 3}: both ways one pixel at 0 and one at 1 -> 0.5
    assert m.assd(pred, target, label=2) == pytest.approx(0.5)
    assert m.assd(pred, target, label=1) == 0.0
    zeros = np.zeros((4, 4), np.uint8)
    one = zeros.copy()
    one[1, 1] = 1
    assert m.assd(zeros, zeros) == 0.0
    assert m.assd(one, zeros) == math.inf and m.assd(zeros, one) == math.inf
    with pytest.raises(UMLInputError, match="one value per dimension"):
        m.assd(one, one, spacing=(1.0, 1.0, 1.0))


# ---------------------------------------------------------------------------------------------------- kappa, F1


def test_confusion_matrix_rows_are_true_classes():
    p = np.array([0.9, 0.2, 0.6, 0.4, 0.5])  # predicted 1, 0, 1, 0, 1 (threshold 0.5 inclusive)
    y = np.array([1, 0, 0, 1, 1])
    assert m.confusion_matrix(p, y).tolist() == [[1, 1], [1, 2]]
    assert m.confusion_matrix(p, y, threshold=0.7).tolist() == [[2, 0], [2, 1]]
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2]])
    assert m.confusion_matrix(probs, [0, 1, 1, 2]).tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]


def test_cohen_kappa_hand_values():
    # TP 20, FN 5, FP 10, TN 15 (n = 50): p_o = 0.7; p_e = (25 * 30 + 25 * 20) / 2500 = 0.5 -> kappa 0.4
    p = np.array([1.0] * 20 + [0.0] * 5 + [1.0] * 10 + [0.0] * 15)
    y = np.array([1] * 25 + [0] * 25)
    assert m.cohen_kappa(p, y) == pytest.approx(0.4)
    assert m.cohen_kappa(y.astype(float), y) == pytest.approx(1.0)
    assert m.cohen_kappa(1.0 - y, y) == pytest.approx(-1.0)
    assert math.isnan(m.cohen_kappa(np.ones(4), np.ones(4, int)))  # one class everywhere: chance agreement is 1
    # three classes: diag (1, 1, 1) of 4, marginals true (1, 1, 2), predicted (1, 2, 1): p_e = 5 / 16
    probs = np.eye(3)[[0, 1, 2, 1]]
    assert m.cohen_kappa(probs, [0, 1, 2, 2]) == pytest.approx((0.75 - 5 / 16) / (1 - 5 / 16))


def test_sensitivity_specificity_and_f1_hand_values():
    p = np.array([1.0] * 20 + [0.0] * 5 + [1.0] * 10 + [0.0] * 15)  # TP 20, FN 5, FP 10, TN 15
    y = np.array([1] * 25 + [0] * 25)
    assert m.sensitivity(p, y) == pytest.approx(0.8)
    assert m.specificity(p, y) == pytest.approx(0.6)
    assert m.f1_score(p, y) == pytest.approx(40 / 55)  # 2 TP / (2 TP + FP + FN)
    assert m.f1_score(p, y, positive=0) == pytest.approx(30 / 45)  # class 0: TP 15, FP 5, FN 10
    assert m.f1_score(p, y, average="macro") == pytest.approx((40 / 55 + 30 / 45) / 2)
    assert m.f1_score(p, y, average="weighted") == pytest.approx((40 / 55 + 30 / 45) / 2)  # 25 labels each
    assert m.sensitivity(p, y, positive=0) == pytest.approx(0.6)  # the recall of class 0 is class 1's specificity
    assert math.isnan(m.sensitivity(np.zeros(3), np.zeros(3, int)))  # no positive label
    assert math.isnan(m.specificity(np.ones(3), np.ones(3, int)))  # no negative label
    assert m.f1_score(np.zeros(3), np.zeros(3, int)) == 0.0  # class 1 never labelled nor predicted


def test_f1_weighted_and_macro_with_unequal_classes():
    probs = np.eye(3)[[0, 0, 0, 1, 2, 2]]  # predictions
    y = np.array([0, 0, 1, 1, 2, 0])
    # class 0: TP 2, FP 1, FN 1 -> 2/3 (support 3); class 1: TP 1, FN 1 -> 2/3 (2); class 2: TP 1, FP 1 -> 2/3 (1)
    assert m.f1_score(probs, y, average="macro") == pytest.approx(2 / 3)
    y2 = np.array([0, 0, 0, 1, 1, 1])
    # class 0: 1 (support 3); class 1: TP 1, FN 2 -> 0.5 (support 3); class 2: TP 0, FP 2 -> 0 (support 0)
    assert m.f1_score(probs, y2, average="macro") == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3: class 2 was predicted
    assert m.f1_score(probs, y2, average="weighted") == pytest.approx(0.75)
    with pytest.raises(UMLInputError, match="average"):
        m.f1_score(probs, y2, average="micro")
