"""umlcore.reader: the lesion reader's config, components, patches, suspicion; its place in bundles and the predictor."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file

from umlcore.bundle import CARD_FILE, WEIGHTS_FILE, load_bundle, save_bundle, sha256_file
from umlcore.errors import BundleError
from umlcore.fusion import (EVIDENCE_PROBABILITY_CLIP, READER_FUSION_RULES, READER_SCORE_CLIP, STACKING_TERMS,
                            calibrate_case_alpha, fuse_reader_opinion, stack_reader_opinion, stacking_features)
from umlcore.predictor import Predictor
from umlcore.reader import (READER_TARGETS, LesionReader, ReaderConfig, component_centres, cut_patch,
                            largest_components, read_patches, suspicion)


def test_config_defaults_and_validation():
    c = ReaderConfig()
    assert (c.width, c.context_slices, c.patch_size, c.pixel_mm, c.max_components, c.weight, c.fusion) == \
        (16, 1, 80, 1.0, 3, 0.5, "average")
    assert ReaderConfig(fusion="logit", weight=2.5).weight == 2.5  # a log-odds factor may exceed 1
    for bad, fragment in (({"patch_size": 20}, "patch_size"), ({"weight": 1.5}, r"weight must be a number in \[0, 1\]"),
                          ({"width": 0}, "width"), ({"context_slices": True}, "context_slices"),
                          ({"pixel_mm": 0}, "pixel_mm"), ({"max_components": 0}, "max_components"),
                          ({"fusion": "mean"}, "fusion must be one of"), ({"weight": True}, "weight"),
                          ({"fusion": "logit", "weight": 4.5}, r"weight must be a number in \[0, 4\]"),
                          ({"test_time_augmentation": "flips"}, r"test_time_augmentation must be one of \['none', 'dihedral'\]"),
                          ({"segmentation_min_lesion": 1.0}, r"segmentation_min_lesion must be null or a probability in \(0, 1\)"),
                          ({"segmentation_min_lesion": True}, "segmentation_min_lesion"),
                          ({"segmentation_max_components": 0}, "segmentation_max_components"),
                          ({"opinion_reads": "raw"}, r"opinion_reads must be one of \['filtered', 'checked'\]"),
                          ({"opinion_reads": "checked"}, "set segmentation_min_lesion too")):
        with pytest.raises(BundleError, match=fragment):
            ReaderConfig(**bad)


def test_reader_shapes_and_parameter_count():
    net = LesionReader(9)
    assert net(torch.zeros(2, 9, 80, 80)).shape == (2, len(READER_TARGETS))
    assert sum(p.numel() for p in net.parameters()) == 73_555  # 9*16*9 + 16*16*9 + ... + 128*3 + 3 (3 stages 16-32-64)


def test_read_patches_averages_the_eight_flips_and_transposes():
    torch.manual_seed(0)
    net = LesionReader(3, width=4).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        one = torch.sigmoid(net(x))
        views = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2), x.transpose(-1, -2), x.flip(-1).transpose(-1, -2),
                 x.flip(-2).transpose(-1, -2), x.flip(-1).flip(-2).transpose(-1, -2)]
        mean = torch.stack([torch.sigmoid(net(v)) for v in views]).mean(0)
    torch.testing.assert_close(read_patches(net, x), one)
    got = read_patches(net, x, "dihedral")
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, mean, rtol=1e-5, atol=1e-6)
    assert (got - one).abs().max() > 1e-4  # an untrained reader is not flip-invariant: the views differ
    symmetric = x + x.flip(-1)
    symmetric = symmetric + symmetric.flip(-2)
    symmetric = symmetric + symmetric.transpose(-1, -2)  # invariant under all eight: the mean is the one pass
    torch.testing.assert_close(read_patches(net, symmetric, "dihedral"), read_patches(net, symmetric),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="tta must be one of"):
        read_patches(net, x, "flips")


def test_component_centres_are_largest_first_with_the_widest_slice():
    mask = np.zeros((4, 20, 20), np.uint8)
    mask[1:3, 2:6, 2:6] = 1      # 32 voxels, both slices 16: the first slice wins the tie
    mask[0:4, 10:13, 14:17] = 1  # 36 voxels
    mask[3, 12:15, 14:17] = 1    # ... rows 13-14 are new there: 42 voxels, widest in slice 3 (rows 10-14)
    (big, z1, y1, x1), (small, z2, y2, x2) = component_centres(mask, 3)
    assert (big, z1) == (42, 3) and (y1, x1) == pytest.approx((12.0, 15.0))
    assert (small, z2, y2, x2) == (32, 1, 3.5, 3.5)
    assert component_centres(mask, 1) == [(42, 3, 12.0, 15.0)]
    assert component_centres(np.zeros_like(mask), 2) == []
    components, found = largest_components(mask, 3)
    assert [f[1:] for f in found] == component_centres(mask, 3)
    assert [int((components == cid).sum()) for cid, *_ in found] == [42, 32] and components[mask == 0].max() == 0
    assert largest_components(np.zeros_like(mask), 2)[1] == []


def test_patches_sample_millimetres_on_anisotropic_pixels():
    # value = row index * 10 + column index: bilinear sampling reproduces it exactly inside the volume
    s, h, w = 3, 40, 60
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    channels = np.stack([np.broadcast_to(rows * 10.0 + cols + 1000.0 * c, (s, h, w)) for c in range(2)])
    p = cut_patch(channels, 0, 20.0, 30.0, spacing_hw=(2.0, 0.5), size=8, context=1, pixel_mm=1.0)
    assert p.shape == (2 * 3, 8, 8) and p.dtype == np.float32
    offsets = np.arange(8) - 3.5  # mm from the centre
    np.testing.assert_allclose(p[1, :, 0], (20 + offsets / 2.0) * 10 + (30 - 3.5 / 0.5), rtol=1e-6)  # rows: 2 mm
    np.testing.assert_allclose(p[1, 0, :], (20 - 3.5 / 2.0) * 10 + 30 + offsets / 0.5, rtol=1e-6)   # cols: 0.5 mm
    np.testing.assert_allclose(p[3:] - p[:3], 1000.0)  # channel-major: all slices of channel 0 first
    assert cut_patch(channels, 0, 0.0, 0.0, (1.0, 1.0), 4, 0)[0, 0, 0] == 0.0  # outside the volume: 0


def test_most_suspicious_is_the_component_of_the_case_score():
    from umlcore.reader import most_suspicious

    p = np.array([[0.99, 0.1, 0.1], [0.9, 0.81, 0.12], [0.5, 0.9, 0.9]])  # suspicion 0.188, 0.750, 0.495
    np.testing.assert_array_equal(most_suspicious(p), p[1])
    np.testing.assert_array_equal(most_suspicious(np.vstack([p[1], p[1] * 1.0])), p[1])  # ties: the first


def test_suspicion_is_the_label_rule():
    p = np.array([[1.0, 0.0, 0.0], [1.0, 0.5, 0.5], [0.5, 1.0, 0.0], [0.0, 1.0, 1.0]])
    np.testing.assert_allclose(suspicion(p), [0.0, 0.75, 0.5, 0.0])


def test_reader_fusion_keeps_the_strength_and_moves_the_probability_by_the_weight():
    alpha = np.array([7.0, 3.0])  # S = 10, evidence 6 / 2
    np.testing.assert_array_equal(fuse_reader_opinion(alpha, 0.9, 0.0), alpha)
    np.testing.assert_allclose(fuse_reader_opinion(alpha, 0.75, 1.0), [1 + 8 * 0.25, 1 + 8 * 0.75])
    half = fuse_reader_opinion(alpha, 0.75, 0.5)
    np.testing.assert_allclose(half, [1 + 0.5 * 6 + 0.5 * 2, 1 + 0.5 * 2 + 0.5 * 6])
    assert half.sum() == pytest.approx(10.0)
    np.testing.assert_allclose(fuse_reader_opinion(alpha, 0.75, 1.0, positive=0), [1 + 8 * 0.75, 1 + 8 * 0.25])
    for bad in ((np.array([1.0, 2.0, 3.0]), 0.5, 0.5), (np.array([0.5, 2.0]), 0.5, 0.5), (alpha, 1.2, 0.5), (alpha, 0.5, -0.1)):
        with pytest.raises(ValueError):
            fuse_reader_opinion(*bad)


def test_logit_fusion_adds_the_weighted_log_odds_of_the_score():
    alpha = np.array([7.0, 3.0])  # S = 10, p = 0.3
    logit = lambda q: np.log(q / (1 - q))
    got = fuse_reader_opinion(alpha, 0.9, 0.5, mode="logit")
    p = 1 / (1 + np.exp(-(logit(0.3) + 0.5 * logit(0.9))))  # odds 3/7 * 3 = 9/7: p = 9/16
    assert p == pytest.approx(9 / 16) and got.sum() == pytest.approx(10.0)
    np.testing.assert_allclose(got, [10 * (1 - p), 10 * p])
    np.testing.assert_allclose(fuse_reader_opinion(alpha, 0.5, 2.0, mode="logit"), alpha)  # 0.5 says nothing
    np.testing.assert_array_equal(fuse_reader_opinion(alpha, 0.9, 0.0, mode="logit"), alpha)
    # the score is clipped to [1e-3, 1 - 1e-3], the result to [1 / S, 1 - 1 / S] (alpha >= 1)
    np.testing.assert_allclose(fuse_reader_opinion(alpha, 1.0, 1.0, mode="logit"),
                               fuse_reader_opinion(alpha, 1 - READER_SCORE_CLIP, 1.0, mode="logit"))
    np.testing.assert_allclose(fuse_reader_opinion(alpha, 1.0, 4.0, mode="logit"), [1.0, 9.0])
    np.testing.assert_allclose(fuse_reader_opinion(alpha, 0.9, 0.5, positive=0, mode="logit")[0],
                               10 / (1 + np.exp(-(logit(0.7) + 0.5 * logit(0.9)))))
    for bad, fragment in (((alpha, 0.5, 4.5, 1, "logit"), r"\[0, 4\]"), ((alpha, 0.5, 1.5), r"\[0, 1\]"),
                          ((alpha, 0.5, 0.5, 1, "mean"), "unknown reader fusion")):
        with pytest.raises(ValueError, match=fragment):
            fuse_reader_opinion(*bad)


# ------------------------------------------------------------------------------------------- in a bundle


@pytest.fixture(scope="module")
def reader_bundle_dir(tiny_bundle, tmp_path_factory):
    """The tiny bundle plus a reader whose head makes every patch a lesion (large logit bias) of known suspicion."""
    torch.manual_seed(1)
    reader = LesionReader(9, width=4)
    with torch.no_grad():
        reader.head.weight.zero_()
        reader.head.bias.copy_(torch.tensor([8.0, 0.0, -1.0]))  # p = 0.99966, 0.5, 0.2689
    card = dataclasses.replace(tiny_bundle.card, reader=ReaderConfig(width=4, patch_size=16, training={"note": "test"}))
    return save_bundle(tiny_bundle.model, card, tmp_path_factory.mktemp("reader") / "bundle", reader=reader)


def test_evidence_fusion_pools_log_odds_and_adds_only_the_evidence_the_result_needs():
    alpha = np.array([7.0, 3.0])  # S = 10, u = 0.2, p = 0.3: the bounds [0.1, 0.9]
    inside = fuse_reader_opinion(alpha, 0.9, 0.5, mode="evidence")  # p' = 9/16 lies inside: S kept, as "logit"
    np.testing.assert_allclose(inside, fuse_reader_opinion(alpha, 0.9, 0.5, mode="logit"))
    # odds 3/7 * 9^2 = 243/7: p' = 243/250 needs S' = 250/7 (u' = 2 * 7/250 = 0.056); "logit" stops at p = 0.9
    got = fuse_reader_opinion(alpha, 0.9, 2.0, mode="evidence")
    np.testing.assert_allclose(got, [1.0, 243 / 7])
    assert fuse_reader_opinion(alpha, 0.9, 2.0, mode="logit")[1] == pytest.approx(9.0)
    # the other way round (odds 3/7 / 81 = 1/189: S' = 190); the least strength makes the smaller alpha exactly 1
    np.testing.assert_allclose(fuse_reader_opinion(alpha, 0.1, 2.0, mode="evidence"), [189.0, 1.0])
    # a sure reader with the largest weight: p' is clipped, so S stays below 1 / clip
    sure = fuse_reader_opinion(alpha, 1.0, 4.0, mode="evidence")
    assert sure.sum() == pytest.approx(1 / EVIDENCE_PROBABILITY_CLIP) and sure.min() == pytest.approx(1.0)
    np.testing.assert_array_equal(fuse_reader_opinion(alpha, 0.9, 0.0, mode="evidence"), alpha)
    assert ReaderConfig(fusion="evidence", weight=0.7).fusion == "evidence"
    with pytest.raises(BundleError, match=r"\[0, 4\]"):
        ReaderConfig(fusion="evidence", weight=5.0)


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
    with pytest.raises(ValueError, match="one finite number for each"):
        stack_reader_opinion(alpha, p, {"intercept": 1.0})
    with pytest.raises(ValueError, match="stack_reader_opinion"):
        fuse_reader_opinion(alpha, 0.9, 1.0, mode="stacked")


def test_stacked_config_needs_its_coefficients_and_only_it_has_them():
    coefficients = dict.fromkeys(STACKING_TERMS, 0.5)
    assert ReaderConfig(fusion="stacked", weight=1.0, stacking=coefficients).stacking == coefficients
    for bad, fragment in (({"fusion": "stacked", "weight": 1.0}, "needs stacking"),
                          ({"fusion": "stacked", "weight": 1.0, "stacking": {**coefficients, "network": float("nan")}},
                           "needs stacking"),
                          ({"fusion": "stacked", "weight": 1.0, "stacking": {"intercept": 0.0}}, "needs stacking"),
                          ({"fusion": "stacked", "weight": 0.5, "stacking": coefficients}, "weight must be 1"),
                          ({"fusion": "evidence", "weight": 1.0, "stacking": coefficients}, "fusion 'stacked' only")):
        with pytest.raises(BundleError, match=fragment):
            ReaderConfig(**bad)


def test_calibration_with_a_least_strength_holds_the_calibrated_probability():
    alpha = np.array([8.0, 2.0])  # S = 10, p = 0.2
    q = 1 / (1 + np.exp(-(np.log(0.25) - np.log(9.0))))  # slope 1, intercept -log 9: odds 1/4 / 9 = 1/36
    assert q == pytest.approx(1 / 37)
    kept = calibrate_case_alpha(alpha, 1.0, -np.log(9.0))  # S kept: q clipped to 1 / S = 0.1
    np.testing.assert_allclose(kept, [9.0, 1.0])
    raised = calibrate_case_alpha(alpha, 1.0, -np.log(9.0), min_strength=10.0)  # S' = 37: u' = 2/37
    np.testing.assert_allclose(raised, [36.0, 1.0])
    # where q lies inside the bounds of min_strength, the result has that strength (even below alpha's own)
    np.testing.assert_allclose(calibrate_case_alpha(np.array([80.0, 20.0]), 1.0, 0.0, min_strength=10.0), [8.0, 2.0])
    with pytest.raises(ValueError, match="min_strength must be >= 2"):
        calibrate_case_alpha(alpha, 1.0, 0.0, min_strength=1.0)


def test_bundle_round_trips_the_reader(reader_bundle_dir, tiny_bundle):
    b = load_bundle(reader_bundle_dir)
    assert b.card.reader == ReaderConfig(width=4, patch_size=16, training={"note": "test"})
    assert not b.reader.training and b.reader.head.bias[0].item() == 8.0
    keys = load_file(str(reader_bundle_dir / WEIGHTS_FILE)).keys()
    assert {k for k in keys if not k.startswith("reader.")} == set(tiny_bundle.model.state_dict())
    with pytest.raises(BundleError, match="give a reader exactly when"):
        save_bundle(b.model, b.card, reader_bundle_dir.parent / "x")


def _rewrite(folder, card=None, state=None):
    if state is not None:
        save_file(state, str(folder / WEIGHTS_FILE))
        card = card or json.loads((folder / CARD_FILE).read_text())
        card["weights"]["sha256"] = sha256_file(folder / WEIGHTS_FILE)
    (folder / CARD_FILE).write_text(json.dumps(card))


def test_reader_weights_and_card_must_go_together(reader_bundle_dir, tmp_path):
    no_section = tmp_path / "a"
    shutil.copytree(reader_bundle_dir, no_section)
    card = json.loads((no_section / CARD_FILE).read_text())
    card["reader"] = None
    _rewrite(no_section, card)
    with pytest.raises(BundleError, match="reader.* tensors but no reader section"):
        load_bundle(no_section)

    no_weights = tmp_path / "b"
    shutil.copytree(reader_bundle_dir, no_weights)
    state = {k: v for k, v in load_file(str(no_weights / WEIGHTS_FILE)).items() if not k.startswith("reader.")}
    _rewrite(no_weights, state=state)
    with pytest.raises(BundleError, match="do not fit"):
        load_bundle(no_weights)

    bad = tmp_path / "c"
    shutil.copytree(reader_bundle_dir, bad)
    card = json.loads((bad / CARD_FILE).read_text())
    card["reader"]["weight"] = 2
    _rewrite(bad, card)
    with pytest.raises(BundleError, match="reader section is invalid: weight"):
        load_bundle(bad)


# ------------------------------------------------------------------------------------------- in the predictor


def _lesion_volume(make_volume):
    """The test volume with a bright cube the tiny network is forced to segment (see ``forced``)."""
    return make_volume(size=(48, 40, 6), spacing=(0.8, 0.6, 2.0))


@pytest.fixture(scope="module")
def forced(reader_bundle_dir, box_segmentation):
    """The reader bundle whose segmentation is fixed: label 1 in a 10 x 12 box of every slice but the first."""
    return box_segmentation(load_bundle(reader_bundle_dir))


def test_predictor_reads_the_segmented_lesions_and_merges_their_score(forced, make_volume):
    volume = _lesion_volume(make_volume)
    with_reader = Predictor(forced, device="cpu").predict([volume] * 3)
    without = Predictor(dataclasses.replace(forced, card=dataclasses.replace(forced.card, reader=None), reader=None),
                        device="cpu").predict([volume] * 3)
    c, c0 = with_reader.summary["classification"], without.summary["classification"]
    assert c0["reader"] is None and without.summary["lesions"] == []
    p = np.array([1 / (1 + np.exp(-8.0)), 0.5, 1 / (1 + np.exp(1.0))])
    score = float(suspicion(p))
    assert c["reader"]["applied"] and c["reader"]["reason"] is None and c["reader"]["weight"] == 0.5
    assert c["reader"]["score"] == pytest.approx(score, rel=1e-6)
    np.testing.assert_allclose(c["reader"]["network_probabilities"], c0["probabilities"], rtol=1e-12)
    # the strength (uncertainty, verdict) is kept; the probability moves half-way to the score (then calibrates)
    strength = 2.0 / c0["uncertainty"]
    expected = fuse_reader_opinion(strength * np.array(c0["probabilities"]), score, 0.5)
    np.testing.assert_allclose(c["probabilities"], expected / strength, rtol=1e-6)
    assert c["uncertainty"] == pytest.approx(c0["uncertainty"]) and c["verdict"] == c0["verdict"]
    (lesion,) = with_reader.summary["lesions"]
    assert lesion["rank"] == 0 and lesion["voxel_count"] == 5 * 10 * 12
    assert lesion["volume_ml"] == pytest.approx(600 * 0.8 * 0.6 * 2.0 / 1000)
    assert lesion["probabilities"] == pytest.approx(dict(zip(READER_TARGETS, p)), rel=1e-6)
    # the centre lies on the input grid: index (x, y, z) = (25.5, 14.5, first widest slice 1), in LPS through the image
    assert lesion["centre_index"] == pytest.approx([25.5, 14.5, 1.0])
    assert lesion["centre_lps"] == pytest.approx(volume.TransformContinuousIndexToPhysicalPoint((25.5, 14.5, 1.0)))
    labels = sitk.GetArrayFromImage(with_reader.labelmap)
    assert labels[1, 14, 25] == 1 and labels[0].max() == 0


def test_predictor_reads_eight_views_with_dihedral_test_time_augmentation(forced, make_volume):
    volume = _lesion_volume(make_volume)
    seen = []
    reader = forced.reader
    hook = reader.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        card = dataclasses.replace(forced.card, reader=dataclasses.replace(forced.card.reader,
                                                                           test_time_augmentation="dihedral"))
        c = Predictor(dataclasses.replace(forced, card=card), device="cpu").predict([volume] * 3).summary
        Predictor(forced, device="cpu").predict([volume] * 3)
    finally:
        hook.remove()
    assert seen == [8, 1]  # one component: 8 views of its patch, then the card without it reads 1
    # this reader's head is constant, so the mean of the views is its one answer
    p = np.array([1 / (1 + np.exp(-8.0)), 0.5, 1 / (1 + np.exp(1.0))])
    assert c["lesions"][0]["probabilities"] == pytest.approx(dict(zip(READER_TARGETS, p)), rel=1e-6)


def test_predictor_applies_the_cards_fusion_rule(forced, make_volume):
    volume = _lesion_volume(make_volume)
    card = dataclasses.replace(forced.card, reader=dataclasses.replace(forced.card.reader, fusion="logit", weight=1.5))
    c = Predictor(dataclasses.replace(forced, card=card), device="cpu").predict([volume] * 3).summary["classification"]
    r = c["reader"]
    assert r["applied"] and r["weight"] == 1.5 and r["fusion"] == READER_FUSION_RULES["logit"]
    strength = 2.0 / c["uncertainty"]
    expected = fuse_reader_opinion(strength * np.array(r["network_probabilities"]), r["score"], 1.5, mode="logit")
    np.testing.assert_allclose(c["probabilities"], expected / strength, rtol=1e-6)


def test_predictor_calibrates_after_the_reader(forced, make_volume):
    volume = _lesion_volume(make_volume)
    calibration = {"slope": 0.5, "intercept": 0.3}
    plain = Predictor(forced, device="cpu").predict([volume] * 3).summary["classification"]
    card = dataclasses.replace(forced.card, case_calibration=calibration)
    got = Predictor(dataclasses.replace(forced, card=card), device="cpu").predict([volume] * 3).summary["classification"]
    strength = 2.0 / plain["uncertainty"]
    expected = calibrate_case_alpha(strength * np.array(plain["probabilities"]), 0.5, 0.3)
    np.testing.assert_allclose(got["probabilities"], expected / strength, rtol=1e-9)


def test_predictor_with_the_evidence_rule_calibrates_from_the_networks_strength(forced, make_volume):
    volume = _lesion_volume(make_volume)
    reader = dataclasses.replace(forced.card.reader, fusion="evidence", weight=4.0)
    calibration = {"slope": 0.5, "intercept": 0.3}
    card = dataclasses.replace(forced.card, reader=reader, case_calibration=calibration)
    c = Predictor(dataclasses.replace(forced, card=card), device="cpu").predict([volume] * 3).summary["classification"]
    r = c["reader"]
    assert r["applied"] and r["fusion"] == READER_FUSION_RULES["evidence"] and r["weight"] == 4.0
    strength = 2.0 / r["network_uncertainty"]  # the network's own, before the reader
    fused = fuse_reader_opinion(strength * np.array(r["network_probabilities"]), r["score"], 4.0, mode="evidence")
    expected = calibrate_case_alpha(fused, 0.5, 0.3, min_strength=strength)
    np.testing.assert_allclose(c["probabilities"], expected / expected.sum(), rtol=1e-6)
    assert c["uncertainty"] == pytest.approx(2.0 / expected.sum(), rel=1e-6)
    assert c["uncertainty"] <= r["network_uncertainty"] + 1e-12
    np.testing.assert_allclose(sum(c["belief"]) + c["uncertainty"], 1.0)


def test_one_volume_or_nothing_segmented_leaves_the_network_opinion(forced, tiny_bundle, make_volume):
    volume = _lesion_volume(make_volume)
    one = Predictor(forced, device="cpu").predict(volume).summary
    r = one["classification"]["reader"]
    assert not r["applied"] and r["score"] is None and "one volume" in r["reason"] and one["lesions"] == []
    assert one["classification"]["probabilities"] == pytest.approx(r["network_probabilities"], rel=1e-12)
    card = dataclasses.replace(forced.card, component_max_uncertainty=1e-6)  # removes every component
    empty = Predictor(dataclasses.replace(forced, card=card), device="cpu").predict([volume] * 3).summary
    r = empty["classification"]["reader"]
    assert not r["applied"] and "nothing was segmented" in r["reason"] and empty["lesions"] == []


def test_reader_verified_segmentation_keeps_the_components_it_reads_as_lesions(forced, make_volume, tmp_path):
    volume = _lesion_volume(make_volume)
    plain = Predictor(forced, device="cpu").predict([volume] * 3)
    p_lesion = 1 / (1 + np.exp(-8.0))  # this reader's constant lesion probability (0.99966)

    def run(threshold, volumes):
        reader = dataclasses.replace(forced.card.reader, segmentation_min_lesion=threshold)
        return Predictor(dataclasses.replace(forced, card=dataclasses.replace(forced.card, reader=reader)),
                         device="cpu").predict(volumes)

    kept, dropped = run(0.5, [volume] * 3), run(0.9999, [volume] * 3)
    assert p_lesion >= 0.5 and p_lesion < 0.9999
    np.testing.assert_array_equal(sitk.GetArrayFromImage(kept.labelmap), sitk.GetArrayFromImage(plain.labelmap))
    assert kept.summary["postprocessing"] == {"component_max_uncertainty": None, "segmentation_min_lesion": 0.5,
                                              "components_removed": 0, "components_refined": None}
    assert sitk.GetArrayFromImage(dropped.labelmap).max() == 0
    assert dropped.summary["postprocessing"]["components_removed"] == 1
    assert dropped.summary["segments"][0]["voxel_count"] == 0
    for s in (kept.summary, dropped.summary):  # the case opinion reads what it read before, for which it was fitted
        assert s["classification"] == plain.summary["classification"]
        assert [l["voxel_count"] for l in s["lesions"]] == [600]
    assert kept.summary["lesions"][0]["in_labelmap"] and not dropped.summary["lesions"][0]["in_labelmap"]
    assert plain.summary["lesions"][0]["in_labelmap"] and plain.summary["postprocessing"]["segmentation_min_lesion"] is None
    # one volume: the reader does not read, so it does not verify either
    one = run(0.9999, volume)
    assert one.summary["postprocessing"]["segmentation_min_lesion"] is None
    assert sitk.GetArrayFromImage(one.labelmap).max() == 1
    # the card round-trips the three fields
    reader = dataclasses.replace(forced.card.reader, segmentation_min_lesion=0.6, segmentation_max_components=5,
                                 opinion_reads="checked")
    saved = load_bundle(save_bundle(forced.model.inner, dataclasses.replace(forced.card, reader=reader),
                                    tmp_path / "verified", reader=forced.reader))
    assert (saved.card.reader.segmentation_min_lesion, saved.card.reader.segmentation_max_components,
            saved.card.reader.opinion_reads) == (0.6, 5, "checked")


def test_the_opinion_can_read_the_checked_labelmap(forced, make_volume):
    volume = _lesion_volume(make_volume)
    plain = Predictor(forced, device="cpu").predict([volume] * 3).summary

    def run(threshold):
        reader = dataclasses.replace(forced.card.reader, segmentation_min_lesion=threshold, opinion_reads="checked")
        return Predictor(dataclasses.replace(forced, card=dataclasses.replace(forced.card, reader=reader)),
                         device="cpu").predict([volume] * 3).summary

    kept, dropped = run(0.5), run(0.9999)
    assert kept["classification"] == plain["classification"] and kept["lesions"][0]["in_labelmap"]
    # the check removed the only component: the opinion reads nothing, although the filtered labelmap had it
    r = dropped["classification"]["reader"]
    assert not r["applied"] and "nothing was segmented" in r["reason"] and dropped["lesions"] == []
    assert r["network_probabilities"] == plain["classification"]["reader"]["network_probabilities"]  # slice weights


def test_predictor_with_the_stacked_rule(forced, make_volume, tmp_path):
    volume = _lesion_volume(make_volume)
    coefficients = {"intercept": -0.5, "network": 0.2, "suspicion": 1.0, "lesion": 0.1, "spiculated": -0.3,
                    "washout": 0.4}
    reader = dataclasses.replace(forced.card.reader, fusion="stacked", weight=1.0, stacking=coefficients)
    card = dataclasses.replace(forced.card, reader=reader, case_calibration={"slope": 1.0, "intercept": 0.0})
    # the card round-trips through a saved bundle
    saved = load_bundle(save_bundle(forced.model.inner, card, tmp_path / "stacked", reader=forced.reader))
    assert saved.card.reader.stacking == coefficients and saved.card.reader.fusion == "stacked"
    bundle = dataclasses.replace(forced, card=card)
    s = Predictor(bundle, device="cpu").predict([volume] * 3).summary
    c, r = s["classification"], s["classification"]["reader"]
    assert r["applied"] and r["fusion"] == READER_FUSION_RULES["stacked"]
    strength = 2.0 / r["network_uncertainty"]
    top = np.array([s["lesions"][0]["probabilities"][t] for t in READER_TARGETS])
    expected = stack_reader_opinion(strength * np.array(r["network_probabilities"]), top, coefficients)
    np.testing.assert_allclose(c["probabilities"], expected / expected.sum(), rtol=1e-6)
    assert c["uncertainty"] == pytest.approx(2.0 / expected.sum(), rel=1e-6)
    # nothing segmented: the stacking still applies, with the reader's terms 0
    empty = Predictor(dataclasses.replace(bundle, card=dataclasses.replace(card, component_max_uncertainty=1e-6)),
                      device="cpu").predict([volume] * 3).summary["classification"]
    r = empty["reader"]
    assert not r["applied"] and "stacked rule reads the network's opinion alone" in r["reason"]
    expected = stack_reader_opinion(2.0 / r["network_uncertainty"] * np.array(r["network_probabilities"]), None,
                                    coefficients)
    np.testing.assert_allclose(empty["probabilities"], expected / expected.sum(), rtol=1e-6)
    # one volume: the reader and its stacking are not used
    one = Predictor(bundle, device="cpu").predict(volume).summary["classification"]
    assert one["probabilities"] == pytest.approx(one["reader"]["network_probabilities"], rel=1e-12)
