"""umlcore.fusion: lesion-weighted pooling, the reader's stacked rule, the Platt calibration, and which applies."""

import dataclasses

import numpy as np
import pytest

from umlcore.card import STACKING_TERMS, ReaderConfig
from umlcore.fusion import (EVIDENCE_PROBABILITY_CLIP, FUSION_RULE, calibrate_case_alpha, case_opinion,
                            fuse_slice_opinions, stack_reader_opinion, stacking_features)


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


def _logit(p):
    return float(np.log(p / (1 - p)))


def test_stacking_features_are_the_log_odds_of_the_network_and_the_read_lesion():
    got = stacking_features(0.8, np.array([0.9, 0.5, 0.2]))
    suspicion_ = 0.9 * (1 - 0.5 * 0.8)  # 0.54
    np.testing.assert_allclose(got, [1.0, np.log(4.0), _logit(suspicion_), _logit(0.9), 0.0, _logit(0.2)])
    np.testing.assert_allclose(stacking_features(0.8, None), [1.0, np.log(4.0), 0, 0, 0, 0])  # nothing read
    sure = stacking_features(0.5, np.array([1.0, 0.0, 0.0]))  # clipped to [0.01, 0.99]: at most 4.6 per term
    np.testing.assert_allclose(sure[2:], [_logit(0.01), _logit(0.99), _logit(0.01), _logit(0.01)])
    with pytest.raises(ValueError, match="3 probabilities"):
        stacking_features(0.5, np.array([0.5, 1.5, 0.2]))


def test_stacked_rule_is_the_fitted_logistic_model_with_the_evidence_it_needs():
    alpha = np.array([7.0, 3.0])  # S = 10, network p = 0.3
    zero = dict.fromkeys(STACKING_TERMS, 0.0)
    # the network's log-odds alone, coefficient 1: the same p, inside [1/S, 1 - 1/S], so the same opinion
    np.testing.assert_allclose(stack_reader_opinion(alpha, None, {**zero, "network": 1.0}), alpha)
    # a constant log-odds log 99: p' = 0.99 needs S' = 100 (u' = 0.02)
    np.testing.assert_allclose(stack_reader_opinion(alpha, None, {**zero, "intercept": np.log(99.0)}), [1.0, 99.0])
    # the read lesion's terms: logit(p') = 0.5 logit(0.3) + 2 logit(p_spic) - 1
    p = np.array([0.9, 0.8, 0.1])
    c = {**zero, "network": 0.5, "spiculated": 2.0, "intercept": -1.0}
    q = 1 / (1 + np.exp(-(0.5 * _logit(0.3) + 2 * _logit(0.8) - 1.0)))
    got = stack_reader_opinion(alpha, p, c)
    np.testing.assert_allclose(got / got.sum(), [1 - q, q])
    assert got.sum() == pytest.approx(max(10.0, 1 / min(q, 1 - q)))
    flipped = stack_reader_opinion(alpha[::-1].copy(), p, c, positive=0)  # the positive class first
    np.testing.assert_allclose(flipped, got[::-1])
    # a sure rule: the probability is clipped, so the strength stays below 1 / clip
    sure = stack_reader_opinion(alpha, None, {**zero, "intercept": 50.0})
    assert sure.sum() == pytest.approx(1 / EVIDENCE_PROBABILITY_CLIP) and sure.min() == pytest.approx(1.0)
    for bad in ({"intercept": 1.0}, {**zero, "network": float("nan")}):
        with pytest.raises(ValueError, match="one finite number for each"):
            stack_reader_opinion(alpha, p, bad)
    with pytest.raises(ValueError, match="binary"):
        stack_reader_opinion(np.array([1.0, 2.0, 3.0]), p, zero)


def test_platt_calibration_keeps_strength_and_identity():
    alpha = np.array([3.0, 7.0])
    assert np.allclose(calibrate_case_alpha(alpha, 1.0, 0.0), alpha)
    cal = calibrate_case_alpha(alpha, 1.0, -np.log(7 / 3))  # logit(0.7) - logit(0.7) -> p = 0.5
    assert np.allclose(cal, [5.0, 5.0]) and cal.sum() == pytest.approx(10.0)
    # the calibrated probability is clipped to [1/S, 1 - 1/S]: each parameter stays >= 1
    np.testing.assert_allclose(calibrate_case_alpha(np.array([8.0, 2.0]), 1.0, -np.log(9.0)), [9.0, 1.0])
    with pytest.raises(ValueError, match="binary"):
        calibrate_case_alpha(np.ones(3), 1.0, 0.0)


def test_case_opinion_takes_the_stacked_rule_for_phases_and_the_calibrations_otherwise(card_factory):
    from umlcore.config import UMLConfig

    slices = np.array([[3.0, 1.0], [1.0, 5.0], [2.0, 2.0]])
    weights = np.array([1.0, 3.0, 0.0])
    network = fuse_slice_opinions(slices, weights)
    three, one = {"slope": 0.5, "intercept": -1.0}, {"slope": 2.0, "intercept": 1.0}
    card = card_factory(UMLConfig(), case_calibration=three, single_volume_calibration=one)
    top = np.array([0.9, 0.2, 0.8])
    for single, used, name in ((False, three, "case_calibration"), (True, one, "single_volume_calibration")):
        got = case_opinion(card, slices, weights, top, single)
        np.testing.assert_allclose(got.network, network)
        np.testing.assert_allclose(got.alpha, calibrate_case_alpha(network, used["slope"], used["intercept"]))
        assert got.calibration == name
    coefficients = dict(zip(STACKING_TERMS, (-0.5, 0.2, 1.0, 0.1, -0.3, 0.4)))
    with_reader = dataclasses.replace(card, case_calibration=None, reader=ReaderConfig(stacking=coefficients))
    got = case_opinion(with_reader, slices, weights, top, False)
    assert got.calibration == "reader.stacking"
    np.testing.assert_allclose(got.alpha, stack_reader_opinion(network, top, coefficients))
    got = case_opinion(with_reader, slices, weights, None, True)  # one volume: not read, its own calibration
    assert got.calibration == "single_volume_calibration"
    unfitted = dataclasses.replace(card, case_calibration=None, single_volume_calibration=None, reader=ReaderConfig())
    got = case_opinion(unfitted, slices, weights, top, False)  # a reader whose rule is not fitted yet
    assert got.calibration is None and np.array_equal(got.alpha, network)
