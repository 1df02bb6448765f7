"""Motion correction between phases (umlcore.registration) and the card field that asks for it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk

from umlcore import registration
from umlcore.bundle import CARD_FILE, load_bundle, read_card, save_bundle
from umlcore.card import MotionCorrection, card_digest
from umlcore.errors import BundleError
from umlcore.predictor import Predictor
from umlcore.registration import align_phases, estimate_translation, translate
from umlcore.synthetic import generate_case

SHIFT = (1.3, -0.8, 0.6)  # mm, LPS


@pytest.fixture(scope="module")
def phases(oblique_direction):
    """An early phase on an oblique, anisotropic grid, and a pre phase whose content moved by SHIFT."""
    early = generate_case(7, shape=(24, 96, 96), randomize="light").to_sitk()[1]
    early.SetDirection(oblique_direction)
    early.SetSpacing((1.0, 1.0, 2.0))
    pre = translate(early, early, [-v for v in SHIFT])  # pre(p) = early(p - SHIFT)
    return pre, early


def interior(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)[3:-3, 8:-8, 8:-8].astype(np.float64)


def test_the_translation_is_found_in_physical_space(phases):
    pre, early = phases
    found = estimate_translation(early, pre)
    np.testing.assert_allclose(found, SHIFT, atol=0.15)
    assert estimate_translation(early, pre) == found  # the same inputs, the same translation
    np.testing.assert_allclose(estimate_translation(early, early), (0, 0, 0), atol=0.05)


def test_align_phases_moves_the_others_onto_the_reference_grid(phases):
    pre, early = phases
    late = sitk.Cast(early * 1.2, sitk.sitkFloat32)
    (a_pre, a_early, a_late), records = align_phases([pre, early, late], reference=1, max_shift_mm=10.0)
    assert a_early is early and records[1] == registration.PhaseAlignment(None, False, "the reference phase")
    assert records[0].applied and records[0].reason is None
    np.testing.assert_allclose(records[0].shift_mm, SHIFT, atol=0.15)
    np.testing.assert_allclose(records[2].shift_mm, (0, 0, 0), atol=0.05)
    for moved in (a_pre, a_late):
        assert moved.GetPixelID() == sitk.sitkFloat32 and moved.GetSize() == early.GetSize()
        assert moved.GetOrigin() == early.GetOrigin() and moved.GetDirection() == early.GetDirection()
        assert moved.GetSpacing() == early.GetSpacing()
    before = np.abs(interior(pre) - interior(early)).mean()
    after = np.abs(interior(a_pre) - interior(early)).mean()
    ideal = np.abs(interior(translate(pre, early, SHIFT)) - interior(early)).mean()  # moved back exactly
    assert after < 0.5 * before and after < 1.2 * ideal
    # the border takes the nearest voxel, not zeros
    assert sitk.GetArrayFromImage(pre).min() > 0 and sitk.GetArrayFromImage(a_pre).min() > 0


def test_a_longer_shift_than_the_card_allows_is_not_applied(phases):
    pre, early = phases
    (same, _), records = align_phases([pre, early], reference=1, max_shift_mm=0.5)
    assert same is pre and not records[0].applied
    assert "estimated shift (1.6 mm) is longer than the card's 0.5 mm" in records[0].reason
    np.testing.assert_allclose(records[0].shift_mm, SHIFT, atol=0.15)


def test_a_failed_registration_leaves_the_phase_as_it_is(phases, monkeypatch):
    pre, early = phases

    def fails(fixed, moving):
        raise RuntimeError("Exception thrown in SimpleITK ImageRegistrationMethod_Execute:\n"
                           "All samples map outside moving image buffer.")

    monkeypatch.setattr(registration, "estimate_translation", fails)
    (same, _), records = align_phases([pre, early], reference=1, max_shift_mm=10.0)
    assert same is pre and records[0] == registration.PhaseAlignment(
        None, False, "registration failed (All samples map outside moving image buffer.)")


def test_small_volumes_skip_the_coarse_levels():
    assert registration._shrink_factors((256, 256, 24)) == [4, 2, 1]
    assert registration._shrink_factors((64, 64, 8)) == [2, 1]
    assert registration._shrink_factors((32, 32, 6)) == [1]


def test_the_card_field_round_trips_defaults_to_none_and_is_validated(bundle_factory, tmp_path):
    path = bundle_factory()
    bundle = load_bundle(path)
    assert bundle.card.input.motion_correction == MotionCorrection() and bundle.card.input.motion_reference is None
    data = json.loads((path / CARD_FILE).read_text())
    del data["input"]["motion_correction"]  # a card written without the field reads the phases as given
    data["weights"]["card_sha256"] = card_digest(data)
    (path / CARD_FILE).write_text(json.dumps(data))
    assert read_card(path)[0].input.motion_correction.mode == "none"
    spec = dataclasses.replace(bundle.card.input, motion_correction=MotionCorrection("translation", "early", 8.0))
    card = dataclasses.replace(bundle.card, input=spec)
    loaded = load_bundle(save_bundle(bundle.model, card, tmp_path / "mc")).card.input
    assert loaded.motion_correction == MotionCorrection("translation", "early", 8.0) and loaded.motion_reference == 1
    for bad, message in (
        (MotionCorrection("rigid", "early"), r"mode must be 'none' or 'translation', got 'rigid'"),
        (MotionCorrection("translation", ""), r"reference must name one of the channels \['pre', 'early', 'late'\], got ''"),
        (MotionCorrection("translation", "early", 0.0), "max_shift_mm must be a positive number of mm, got 0.0"),
    ):
        with pytest.raises(BundleError, match=message):
            dataclasses.replace(bundle.card.input, motion_correction=bad)


def test_the_predictor_reads_the_aligned_phases_and_reports_them(tiny_bundle, phases):
    pre, early = phases
    spec = dataclasses.replace(tiny_bundle.card.input, motion_correction=MotionCorrection("translation", "early"))
    corrected = Predictor(dataclasses.replace(tiny_bundle, card=dataclasses.replace(tiny_bundle.card, input=spec)),
                          device="cpu")
    plain = Predictor(tiny_bundle, device="cpu")
    got = corrected.predict([pre, early, early])
    mc = got.summary["motion_correction"]
    assert mc["mode"] == "translation" and mc["reference"] == "early" and mc["reason"] is None
    assert [p["channel"] for p in mc["phases"]] == ["pre", "late"] and all(p["applied"] for p in mc["phases"])
    np.testing.assert_allclose(mc["phases"][0]["shift_mm"], SHIFT, atol=0.15)
    # exactly what the network gives for the phases moved by hand
    by_hand = plain.predict([translate(pre, early, mc["phases"][0]["shift_mm"]), early,
                             translate(early, early, mc["phases"][1]["shift_mm"])])
    for a, b in ((got.uncertainty, by_hand.uncertainty), (got.labelmap, by_hand.labelmap)):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    for image in (got.labelmap, got.uncertainty):  # on the input grid
        assert image.GetSize() == pre.GetSize() and image.GetOrigin() == pre.GetOrigin()
        assert image.GetDirection() == pre.GetDirection() and image.GetSpacing() == pre.GetSpacing()
    assert plain.predict([pre, early, early]).summary["motion_correction"] == {
        "mode": "none", "reference": None, "phases": [], "reason": None}
    one = corrected.predict(early).summary["motion_correction"]
    assert one == {"mode": "translation", "reference": "early", "phases": [],
                   "reason": "one volume was given: nothing to align"}
