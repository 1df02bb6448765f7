"""training.fitting: logistic and Platt fits, the stacked rule's fit, and the threshold choices."""

import numpy as np
import pytest

from training.fitting import (choose_check_threshold, choose_component_threshold, fit_logistic, fit_platt,
                              fit_stacking, suggest_review_uncertainty)
from umlcore.card import STACKING_TERMS
from umlcore.fusion import stacking_features


def test_platt_fit_sharpens_an_underconfident_score():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.5 + (y - 0.5) * 0.3 + rng.normal(0, 0.1, 400), 0.01, 0.99)  # underconfident scores
    slope, intercept = fit_platt(p, y)
    assert slope > 1.0
    with pytest.raises(ValueError, match="both classes"):
        fit_platt(p, np.zeros(400))


def test_platt_fit_converges_where_plain_newton_diverged():
    """Eight opinions with large log-odds, not separable: plain Newton steps from (1, 0) ran off to ~1e7; the
    line search reaches the finite optimum (zero gradient, NLL below the identity's)."""
    z = np.array([0.75, -0.79, 3.84, 0.63, -3.21, 2.17, 7.82, 5.68])
    y = np.array([1, 0, 0, 1, 0, 1, 1, 1])
    slope, intercept = fit_platt(1 / (1 + np.exp(-z)), y)
    assert abs(slope) < 10 and abs(intercept) < 10
    q = 1 / (1 + np.exp(-(slope * z + intercept)))
    assert np.allclose([np.sum((q - y) * z), np.sum(q - y)], 0.0, atol=1e-6)

    def nll(a, b):
        return np.sum(np.logaddexp(0, a * z + b) - y * (a * z + b))

    assert nll(slope, intercept) < nll(1.0, 0.0)


def test_fit_logistic_recovers_known_weights_and_honours_the_penalty():
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(size=(5000, 2)), np.ones(5000)]
    y = (rng.random(5000) < 1 / (1 + np.exp(-(x @ np.array([1.5, -0.5, 0.3]))))).astype(float)
    np.testing.assert_allclose(fit_logistic(x, y), [1.5, -0.5, 0.3], atol=0.1)
    # a huge penalty on the slopes leaves the intercept alone: the log-odds of the positive share
    shrunk = fit_logistic(x, y, penalty=np.array([1e9, 1e9, 0.0]))
    np.testing.assert_allclose(shrunk[:2], 0.0, atol=1e-5)
    assert shrunk[2] == pytest.approx(np.log(y.mean() / (1 - y.mean())), abs=1e-4)


def test_fit_stacking_recovers_the_rule_that_made_the_labels():
    rng = np.random.default_rng(1)
    n = 6000
    network = rng.uniform(0.05, 0.95, n)
    reader = [None if rng.random() < 0.2 else rng.uniform(0.05, 0.95, 3) for _ in range(n)]
    truth = np.array([-0.5, 1.0, 0.8, 0.0, 0.6, -0.4])
    x = np.stack([stacking_features(a, b) for a, b in zip(network, reader)])
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ truth)))).astype(int)
    w = fit_stacking(network, reader, y)
    assert w.shape == (len(STACKING_TERMS),)
    np.testing.assert_allclose(w, truth, atol=0.25)
    with pytest.raises(ValueError, match="both classes"):
        fit_stacking(network[:3], reader[:3], [1, 1, 1])


def _row(truth, components):
    return {"lesion_voxels": truth, "components": [dict(zip(("voxels", "inside", "mean_uncertainty", "p_lesion"), c))
                                                   for c in components]}


def test_component_threshold_is_the_one_with_the_best_dice():
    rows = [_row(100, [(100, 90, 0.02, None), (40, 0, 0.09, None), (10, 0, 0.25, None)]),
            _row(10, [(12, 8, 0.11, None), (30, 0, 0.2, None)]), _row(0, [])]
    best, table = choose_component_threshold(rows)
    assert table["none"] == pytest.approx(np.mean([180 / 250, 16 / 52]))
    assert best == 0.12 and table["0.12"] == pytest.approx(np.mean([180 / 240, 16 / 22]))  # 0.15 ties: first wins
    assert choose_component_threshold([_row(10, [(10, 10, 0.5, None)])])[0] is None  # nothing to gain


def test_check_threshold_keeps_what_the_reader_reads_as_a_lesion():
    rows = [_row(100, [(100, 90, 0.02, 0.95), (40, 0, 0.05, 0.72), (5, 0, 0.1, None)]),
            _row(20, [(20, 15, 0.03, 0.78), (30, 0, 0.2, 0.55)])]
    best, table = choose_check_threshold(rows)
    # 0.75 keeps both lesions and drops both false ones (and the unread small one)
    assert best == 0.75 and table["0.75"] == pytest.approx(np.mean([180 / 200, 30 / 40]))
    assert table["0.5"] == pytest.approx(np.mean([180 / 240, 30 / 70]))
    assert table["every component"] < table["0.75"] <= table["true components (oracle)"]


def test_review_threshold_reaches_the_error_rate_of_the_surest_half():
    u = np.array([0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6])
    correct = np.array([1, 1, 1, 1, 1, 0, 1, 0])  # the surest half has no error; the fifth case is still right
    assert suggest_review_uncertainty(u, correct) == 0.3
    assert suggest_review_uncertainty(u, np.ones(8, int)) == 0.6  # never wrong: everything is reliable
