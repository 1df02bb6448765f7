"""Lesion-weighted evidence pooling: known values and invariants."""

import numpy as np
import pytest

from umlcore.fusion import FUSION_RULE, fuse_slice_opinions


def test_known_values_lesion_weighted():
    alpha = np.array([[3.0, 1.0], [1.0, 5.0]])  # evidence [2, 0] and [0, 4]
    fused = fuse_slice_opinions(alpha, np.array([1, 3]))
    # 1 + (1 * [2, 0] + 3 * [0, 4]) / 4 = [1.5, 4.0]
    np.testing.assert_allclose(fused, [1.5, 4.0])


def test_no_lesion_anywhere_gives_uniform_weights():
    alpha = np.array([[3.0, 1.0], [1.0, 5.0], [2.0, 2.0]])  # evidence [2,0], [0,4], [1,1]
    np.testing.assert_allclose(fuse_slice_opinions(alpha, np.zeros(3)), [2.0, 8.0 / 3.0])


def test_slices_without_lesion_do_not_count_when_some_have_lesion():
    alpha = np.array([[9.0, 1.0], [1.0, 4.0], [1.0, 2.0]])
    fused = fuse_slice_opinions(alpha, np.array([0, 2, 6]))
    # 1 + (2 * [0, 3] + 6 * [0, 1]) / 8 = [1, 2.5]
    np.testing.assert_allclose(fused, [1.0, 2.5])


def test_single_slice_and_identical_slices_keep_the_opinion():
    a = np.array([[2.5, 7.0, 1.5]])
    np.testing.assert_allclose(fuse_slice_opinions(a, np.array([4])), a[0])
    many = np.repeat(a, 5, axis=0)
    np.testing.assert_allclose(fuse_slice_opinions(many, np.array([0, 1, 2, 3, 4])), a[0])


def test_weights_are_scale_invariant_and_opinion_is_consistent():
    rng = np.random.default_rng(0)
    alpha = 1.0 + rng.gamma(2.0, 2.0, size=(7, 3))
    w = rng.integers(0, 50, size=7)
    fused = fuse_slice_opinions(alpha, w)
    np.testing.assert_allclose(fused, fuse_slice_opinions(alpha, 10 * w))
    assert fused.shape == (3,) and fused.dtype == np.float64 and np.all(fused >= 1.0)
    s = fused.sum()
    belief, u = (fused - 1) / s, 3 / s
    assert belief.sum() + u == pytest.approx(1.0)
    # pooled evidence lies within the slices' range (a weighted mean)
    e = alpha - 1
    assert np.all(fused - 1 <= e.max(axis=0) + 1e-12) and np.all(fused - 1 >= e.min(axis=0) - 1e-12)


def test_rule_name():
    assert FUSION_RULE == "lesion-weighted evidence pooling"


@pytest.mark.parametrize(
    "alpha, weights, phrase",
    [
        (np.ones(3), np.ones(3), "shape \\(S, K\\)"),
        (np.ones((3, 1)), np.ones(3), "K >= 2"),
        (np.ones((0, 2)), np.ones(0), "S >= 1"),
        (np.ones((3, 2)), np.ones(2), "one count per slice"),
        (np.full((2, 2), 0.5), np.ones(2), ">= 1"),
        (np.array([[1.0, np.nan], [1.0, 2.0]]), np.ones(2), "finite"),
        (np.ones((2, 2)), np.array([1.0, -1.0]), "non-negative"),
        (np.ones((2, 2)), np.array([1.0, np.inf]), "non-negative"),
    ],
)
def test_bad_arguments_are_refused(alpha, weights, phrase):
    with pytest.raises(ValueError, match=phrase):
        fuse_slice_opinions(alpha, weights)


def test_platt_calibration_keeps_strength_and_identity():
    import numpy as np
    from umlcore.fusion import calibrate_case_alpha, fit_platt

    alpha = np.array([3.0, 7.0])
    assert np.allclose(calibrate_case_alpha(alpha, 1.0, 0.0), alpha)
    cal = calibrate_case_alpha(alpha, 1.0, -np.log(7 / 3))  # logit(0.7) - logit(0.7) -> p = 0.5
    assert np.allclose(cal, [5.0, 5.0]) and cal.sum() == pytest.approx(10.0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.5 + (y - 0.5) * 0.3 + rng.normal(0, 0.1, 400), 0.01, 0.99)  # underconfident scores
    slope, intercept = fit_platt(p, y)
    assert slope > 1.0  # sharpening an underconfident score


def test_platt_fit_converges_where_plain_newton_diverged():
    """Eight opinions with large log-odds, not separable: plain Newton steps from (1, 0) ran off to ~1e7; the
    line search reaches the finite optimum (zero gradient, NLL below the identity's)."""
    import numpy as np
    from umlcore.fusion import fit_platt

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
    from umlcore.fusion import fit_logistic

    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(size=(5000, 2)), np.ones(5000)]
    y = (rng.random(5000) < 1 / (1 + np.exp(-(x @ np.array([1.5, -0.5, 0.3]))))).astype(float)
    np.testing.assert_allclose(fit_logistic(x, y), [1.5, -0.5, 0.3], atol=0.1)
    # a huge penalty on the slopes leaves the intercept alone: the log-odds of the positive share
    shrunk = fit_logistic(x, y, penalty=np.array([1e9, 1e9, 0.0]))
    np.testing.assert_allclose(shrunk[:2], 0.0, atol=1e-5)
    assert shrunk[2] == pytest.approx(np.log(y.mean() / (1 - y.mean())), abs=1e-4)
