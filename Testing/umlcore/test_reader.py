"""umlcore.reader: the lesion reader's network, patches, suspicion, its check of the segmentation and its reading,
in a bundle and in the predictor."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file

from umlcore.bundle import CARD_FILE, WEIGHTS_FILE, load_bundle, save_bundle, sha256_file
from umlcore.card import ReaderConfig, card_digest
from umlcore.errors import BundleError
from umlcore.fusion import stack_reader_opinion
from umlcore.predictor import Predictor
from umlcore.reader import (READER_TARGETS, LesionReader, check_and_read, cut_patch, most_suspicious, read_patches,
                            suspicion)

#: The test reader's constant probabilities (its head's bias, every weight 0): lesion, spiculated, washout.
P_CONSTANT = np.array([1 / (1 + np.exp(-8.0)), 0.5, 1 / (1 + np.exp(1.0))])
COEFFICIENTS = {"intercept": -0.5, "network": 0.2, "suspicion": 1.0, "lesion": 0.1, "spiculated": -0.3, "washout": 0.4}


def constant_reader(channels=9, bias=(8.0, 0.0, -1.0)):
    torch.manual_seed(1)
    reader = LesionReader(channels, width=4).eval()
    with torch.no_grad():
        reader.head.weight.zero_()
        reader.head.bias.copy_(torch.tensor(bias))
    return reader


def test_reader_shapes_and_parameter_count():
    net = LesionReader(9)
    assert net(torch.zeros(2, 9, 80, 80)).shape == (2, len(READER_TARGETS))
    assert sum(p.numel() for p in net.parameters()) == 73_555  # 9*16*9 + 16*16*9 + ... + 128*3 + 3 (3 stages 16-32-64)


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


def test_read_patches_averages_the_eight_flips_and_transposes():
    torch.manual_seed(0)
    net = LesionReader(3, width=4).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        one = torch.sigmoid(net(x))
        views = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2), x.transpose(-1, -2), x.flip(-1).transpose(-1, -2),
                 x.flip(-2).transpose(-1, -2), x.flip(-1).flip(-2).transpose(-1, -2)]
        mean = torch.stack([torch.sigmoid(net(v)) for v in views]).mean(0)
    got = read_patches(net, x)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, mean, rtol=1e-5, atol=1e-6)
    assert (got - one).abs().max() > 1e-4  # an untrained reader is not flip-invariant: the views differ
    symmetric = x + x.flip(-1)
    symmetric = symmetric + symmetric.flip(-2)
    symmetric = symmetric + symmetric.transpose(-1, -2)  # invariant under all eight: the mean is the one pass
    with torch.no_grad():
        torch.testing.assert_close(read_patches(net, symmetric), torch.sigmoid(net(symmetric)), rtol=1e-5, atol=1e-6)


def test_most_suspicious_is_the_component_of_the_case_score():
    p = np.array([[0.99, 0.1, 0.1], [0.9, 0.81, 0.12], [0.5, 0.9, 0.9]])  # suspicion 0.188, 0.750, 0.495
    np.testing.assert_array_equal(most_suspicious(p), p[1])
    np.testing.assert_array_equal(most_suspicious(np.vstack([p[1], p[1] * 1.0])), p[1])  # ties: the first


def test_suspicion_is_the_label_rule():
    p = np.array([[1.0, 0.0, 0.0], [1.0, 0.5, 0.5], [0.5, 1.0, 0.0], [0.0, 1.0, 1.0]])
    np.testing.assert_allclose(suspicion(p), [0.0, 0.75, 0.5, 0.0])


def test_check_keeps_the_components_read_as_lesions_and_reads_the_largest_kept():
    stack = np.random.default_rng(0).random((4, 3, 24, 24)).astype(np.float32)
    labels = np.zeros((4, 24, 24), np.uint8)
    labels[0:3, 2:6, 2:6] = 1    # 48 voxels
    labels[1, 12:16, 12:14] = 1  # 8 voxels
    labels[3, 20:22, 20:22] = 1  # 4 voxels
    labels[3, 0, 23] = 1         # 1 voxel
    cfg = ReaderConfig(width=4, patch_size=16, context_slices=0, max_components=2, segmentation_max_components=3)
    sure, unsure = constant_reader(3), constant_reader(3, bias=(-8.0, 0.0, 0.0))
    got = check_and_read(sure, cfg, stack, labels, (1.0, 1.0), torch.device("cpu"))
    # the 3 largest are read and kept, the fourth (not read) goes; the 2 largest kept are read for the opinion
    assert got.removed == 1 and got.checked.sum() == 48 + 8 + 4 and got.checked[3, 0, 23] == 0
    assert [c[0] for c in got.components] == [48, 8] and len(got.checked_components) == 3
    np.testing.assert_allclose(got.probabilities, [P_CONSTANT, P_CONSTANT], rtol=1e-6)
    assert got.score == pytest.approx(float(suspicion(P_CONSTANT)), rel=1e-6)
    np.testing.assert_array_equal(got.top, got.probabilities[0])
    assert labels.sum() == 61  # the input is left alone
    none = check_and_read(unsure, cfg, stack, labels, (1.0, 1.0), torch.device("cpu"))
    assert none.removed == 4 and none.checked.max() == 0 and none.components == [] and none.score is None
    assert none.top is None and len(none.checked_probabilities) == 3
    empty = check_and_read(sure, cfg, stack, np.zeros_like(labels), (1.0, 1.0), torch.device("cpu"))
    assert empty.removed == 0 and empty.components == [] and empty.checked.max() == 0


# ------------------------------------------------------------------------------------------- in a bundle


@pytest.fixture(scope="module")
def reader_bundle_dir(tiny_bundle, tmp_path_factory):
    """The tiny bundle plus a reader of constant probabilities (:data:`P_CONSTANT`), its rule not fitted."""
    card = dataclasses.replace(tiny_bundle.card, reader=ReaderConfig(width=4, patch_size=16, training={"note": "test"}))
    return save_bundle(tiny_bundle.model, card, tmp_path_factory.mktemp("reader") / "bundle", reader=constant_reader())


def test_bundle_round_trips_the_reader(reader_bundle_dir, tiny_bundle):
    b = load_bundle(reader_bundle_dir)
    assert b.card.reader == ReaderConfig(width=4, patch_size=16, training={"note": "test"})
    assert not b.reader.training and b.reader.head.bias[0].item() == 8.0 and b.card.reader.stacking is None
    keys = load_file(str(reader_bundle_dir / WEIGHTS_FILE)).keys()
    assert {k for k in keys if not k.startswith("reader.")} == set(tiny_bundle.model.state_dict())
    with pytest.raises(BundleError, match="give a reader exactly when"):
        save_bundle(b.model, b.card, reader_bundle_dir.parent / "x")


def _rewrite(folder, card=None, state=None):
    if state is not None:
        save_file(state, str(folder / WEIGHTS_FILE))
        card = card or json.loads((folder / CARD_FILE).read_text())
        card["weights"]["sha256"] = sha256_file(folder / WEIGHTS_FILE)
    card["weights"]["card_sha256"] = card_digest(card)
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
    card["reader"]["segmentation_min_lesion"] = 2
    _rewrite(bad, card)
    with pytest.raises(BundleError, match="reader section is invalid: segmentation_min_lesion"):
        load_bundle(bad)


# -------------------------------------------------------------------------------------------- in the predictor


def _lesion_volume(make_volume):
    """The test volume with a bright cube the tiny network is forced to segment (see ``forced``)."""
    return make_volume(size=(48, 40, 6), spacing=(0.8, 0.6, 2.0))


def _phases(make_volume):
    """Three phases on the test volume's grid (three different volumes: identical ones are read as one)."""
    return [make_volume(size=(48, 40, 6), spacing=(0.8, 0.6, 2.0), seed=s, scale=100.0 + 20 * s) for s in range(3)]


@pytest.fixture(scope="module")
def forced(reader_bundle_dir, box_segmentation):
    """The reader bundle whose segmentation is fixed: label 1 in a 10 x 12 box of every slice."""
    return box_segmentation(load_bundle(reader_bundle_dir))




def _predict(bundle, volumes, **reader_changes):
    card = dataclasses.replace(bundle.card, reader=dataclasses.replace(bundle.card.reader, **reader_changes))
    return Predictor(dataclasses.replace(bundle, card=card), device="cpu").predict(volumes)


def test_predictor_checks_and_reads_the_segmented_lesions(forced, make_volume):
    volume = _lesion_volume(make_volume)
    seen = []
    hook = forced.reader.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        with_reader = Predictor(forced, device="cpu").predict(_phases(make_volume))
    finally:
        hook.remove()
    assert seen == [8]  # one component, read once in its 8 flips and transposes
    without = Predictor(dataclasses.replace(forced, card=dataclasses.replace(forced.card, reader=None), reader=None),
                        device="cpu").predict(_phases(make_volume))
    c, c0 = with_reader.summary["classification"], without.summary["classification"]
    assert c0["reader"] is None and without.summary["lesions"] == []
    # the rule is not fitted: the reader reads and checks, the opinion is the network's
    r = c["reader"]
    assert not r["applied"] and "not fitted" in r["reason"] and c["calibration"] is None
    assert r["score"] == pytest.approx(float(suspicion(P_CONSTANT)), rel=1e-6)
    assert c["probabilities"] == pytest.approx(c0["probabilities"], rel=1e-12) == r["network_probabilities"]
    (lesion,) = with_reader.summary["lesions"]
    assert lesion["rank"] == 0 and lesion["voxel_count"] == 6 * 10 * 12
    assert lesion["volume_ml"] == pytest.approx(720 * 0.8 * 0.6 * 2.0 / 1000)
    assert lesion["probabilities"] == pytest.approx(dict(zip(READER_TARGETS, P_CONSTANT)), rel=1e-6)
    # the centre lies on the input grid: index (x, y, z) = (25.5, 14.5, first widest slice 1), in LPS through the image
    assert lesion["centre_index"] == pytest.approx([25.5, 14.5, 0.0])
    assert lesion["centre_lps"] == pytest.approx(volume.TransformContinuousIndexToPhysicalPoint((25.5, 14.5, 0.0)))
    labels = sitk.GetArrayFromImage(with_reader.labelmap)
    assert labels[1, 14, 25] == 1 and labels[0, 14, 25] == 1
    assert with_reader.summary["postprocessing"] == {"component_max_uncertainty": None, "segmentation_min_lesion": 0.75,
                                                     "components_removed": 0}


def test_the_check_removes_what_the_reader_does_not_read_as_a_lesion(forced, make_volume):
    volume = _lesion_volume(make_volume)
    kept = _predict(forced, _phases(make_volume), segmentation_min_lesion=0.5)
    dropped = _predict(forced, _phases(make_volume), segmentation_min_lesion=0.9999)
    assert P_CONSTANT[0] >= 0.5 and P_CONSTANT[0] < 0.9999
    assert sitk.GetArrayFromImage(kept.labelmap).sum() == 720 and sitk.GetArrayFromImage(dropped.labelmap).max() == 0
    assert dropped.summary["postprocessing"]["components_removed"] == 1
    assert dropped.summary["segments"][0]["voxel_count"] == 0 and dropped.summary["lesions"] == []
    # the network's opinion weighs its slices by the uncertainty-filtered labelmap, whatever the check kept
    assert dropped.summary["classification"]["reader"]["network_probabilities"] == \
        kept.summary["classification"]["reader"]["network_probabilities"]
    assert [s["lesion_voxels"] for s in dropped.summary["slices"]] == [s["lesion_voxels"] for s in kept.summary["slices"]]
    # one volume: the reader neither checks nor reads; the uncertainty filter (none here) decides
    one = _predict(forced, volume, segmentation_min_lesion=0.9999)
    assert one.summary["postprocessing"]["segmentation_min_lesion"] is None and one.summary["lesions"] == []
    assert sitk.GetArrayFromImage(one.labelmap).max() == 1
    r = one.summary["classification"]["reader"]
    assert not r["applied"] and r["score"] is None and "one volume" in r["reason"]


def test_predictor_with_the_stacked_rule(forced, make_volume, tmp_path):
    volume = _lesion_volume(make_volume)
    card = dataclasses.replace(forced.card, reader=dataclasses.replace(forced.card.reader, stacking=COEFFICIENTS))
    saved = load_bundle(save_bundle(forced.model.inner, card, tmp_path / "stacked", reader=forced.reader))
    assert saved.card.reader.stacking == COEFFICIENTS
    bundle = dataclasses.replace(forced, card=card)
    s = Predictor(bundle, device="cpu").predict(_phases(make_volume)).summary
    c, r = s["classification"], s["classification"]["reader"]
    assert r["applied"] and r["reason"] is None and c["calibration"] == "reader.stacking"
    strength = 2.0 / r["network_uncertainty"]
    top = np.array([s["lesions"][0]["probabilities"][t] for t in READER_TARGETS])
    expected = stack_reader_opinion(strength * np.array(r["network_probabilities"]), top, COEFFICIENTS)
    np.testing.assert_allclose(c["probabilities"], expected / expected.sum(), rtol=1e-6)
    assert c["uncertainty"] == pytest.approx(2.0 / expected.sum(), rel=1e-6)
    # nothing kept: the stacking still applies, with the reader's terms 0
    empty = _predict(bundle, _phases(make_volume), segmentation_min_lesion=0.9999).summary["classification"]
    r = empty["reader"]
    assert not r["applied"] and "stacked rule reads the network's opinion alone" in r["reason"]
    expected = stack_reader_opinion(2.0 / r["network_uncertainty"] * np.array(r["network_probabilities"]), None,
                                    COEFFICIENTS)
    np.testing.assert_allclose(empty["probabilities"], expected / expected.sum(), rtol=1e-6)
    # one volume: the reader and its stacking are not used
    one = Predictor(bundle, device="cpu").predict(volume).summary["classification"]
    assert one["probabilities"] == pytest.approx(one["reader"]["network_probabilities"], rel=1e-12)
