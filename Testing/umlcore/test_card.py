"""umlcore.card: the model card's fields, their checks, and the migration of schema-1 cards."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from umlcore.bundle import CARD_FILE, load_bundle, save_bundle
from umlcore.card import (SCHEMA_VERSION, STACKING_TERMS, InputSpec, ModelCard, MotionCorrection, ReaderConfig, Segment,
                          card_digest, card_from_dict, migrate_v1)
from umlcore.config import UMLConfig
from umlcore.errors import BundleError
from umlcore.network import UMLNet

SHIPPED = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "uml-breast-dce-small" / CARD_FILE
COEFFICIENTS = dict(zip(STACKING_TERMS, (-1.888, 0.139, 1.032, 0.221, -0.267, -0.043)))


def make_card(cfg, input=InputSpec()):
    return ModelCard(
        id="test-model", version="0.0.1", name="Test", task="test", classes=("negative", "positive"),
        segments=(Segment(1, "Lesion", (1.0, 0.5, 0.0), {"type": {"scheme": "SCT", "code": "52988006", "meaning": "Lesion"}}),),
        input=input, architecture=cfg)


def shipped_as_schema_1() -> dict:
    """The shipped card as it was written in schema 1 (1.12.0 before the redesign)."""
    d = json.loads(SHIPPED.read_text())
    d = {k: v for k, v in d.items() if k != "changelog"}
    d["schema_version"] = 1
    d["test_time_augmentation"], d["refiner"] = "none", None
    d["case_calibration"] = {"slope": 1.0, "intercept": 0.0, "note": "the identity"}
    d["reader"] = {**d["reader"], "weight": 1.0, "fusion": "stacked", "test_time_augmentation": "dihedral",
                   "opinion_reads": "checked"}
    return d


def test_reader_config_checks_every_field():
    c = ReaderConfig()
    assert (c.width, c.context_slices, c.patch_size, c.pixel_mm, c.max_components, c.stacking,
            c.segmentation_min_lesion, c.segmentation_max_components) == (16, 1, 80, 1.0, 3, None, 0.75, 8)
    assert ReaderConfig(stacking=COEFFICIENTS).stacking == COEFFICIENTS
    for bad, fragment in (({"patch_size": 20}, "patch_size"), ({"width": 0}, "width"),
                          ({"context_slices": True}, "context_slices"), ({"pixel_mm": 0}, "pixel_mm"),
                          ({"max_components": 0}, "max_components"),
                          ({"segmentation_max_components": 0}, "segmentation_max_components"),
                          ({"segmentation_min_lesion": 1.0}, r"segmentation_min_lesion must be a probability in \(0, 1\)"),
                          ({"segmentation_min_lesion": None}, "segmentation_min_lesion"),
                          ({"stacking": {"intercept": 0.0}}, "stacking must be null or one finite number"),
                          ({"stacking": {**COEFFICIENTS, "network": float("nan")}}, "stacking")):
        with pytest.raises(BundleError, match="reader section is invalid: .*" + fragment):
            ReaderConfig(**bad)


def test_card_must_match_architecture():
    with pytest.raises(BundleError, match="lists 3 classes"):
        ModelCard(id="x", version="1", name="x", task="x", classes=("a", "b", "c"), segments=(Segment(1, "L"),),
                  input=InputSpec(), architecture=UMLConfig())


def test_a_fitted_reader_takes_no_case_calibration_and_needs_a_binary_model():
    card = make_card(UMLConfig())
    assert dataclasses.replace(card, reader=ReaderConfig(), case_calibration={"slope": 1, "intercept": 0})  # unfitted
    with pytest.raises(BundleError, match="remove case_calibration"):
        dataclasses.replace(card, reader=ReaderConfig(stacking=COEFFICIENTS), case_calibration={"slope": 1, "intercept": 0})
    with pytest.raises(BundleError, match="a reader needs a binary model"):
        ModelCard(id="x", version="1", name="x", task="x", classes=("a", "b", "c"), segments=(Segment(1, "L"),),
                  input=InputSpec(), architecture=UMLConfig(num_classes=3), reader=ReaderConfig())


@pytest.mark.parametrize("value", [0.0, 1.5, "0.1"])
def test_review_threshold_must_be_in_0_1(value):
    with pytest.raises(BundleError, match="review_uncertainty must be a number in"):
        dataclasses.replace(make_card(UMLConfig()), review_uncertainty=value)


@pytest.mark.parametrize("value", [0.0, 1.5, "0.1"])
def test_component_threshold_must_be_in_0_1(value):
    with pytest.raises(BundleError, match="component_max_uncertainty must be a number in"):
        ModelCard(id="x", version="1", name="x", task="x", classes=("a", "b"), segments=(Segment(1, "L"),),
                  input=InputSpec(), architecture=UMLConfig(), component_max_uncertainty=value)


@pytest.mark.parametrize("value", [-1, 9, 1.0, True])
def test_context_slices_must_be_a_small_integer(value):
    with pytest.raises(BundleError, match="context_slices must be an integer from 0 to 8"):
        InputSpec(context_slices=value)


@pytest.mark.parametrize("field", ["case_calibration", "single_volume_calibration"])
def test_a_calibration_needs_slope_and_intercept(field):
    with pytest.raises(BundleError, match=f"{field} needs a binary model and the numbers 'slope' and 'intercept'"):
        ModelCard(id="x", version="1", name="x", task="x", classes=("a", "b"), segments=(Segment(1, "L"),),
                  input=InputSpec(), architecture=UMLConfig(), **{field: {"slope": 1.0}})


def test_single_volume_calibration_is_chosen_for_one_volume_and_round_trips(tmp_path):
    three, one = {"slope": 0.6, "intercept": -0.4}, {"slope": 0.3, "intercept": 0.1}
    net = UMLNet(UMLConfig())
    card = dataclasses.replace(make_card(net.config), case_calibration=three, single_volume_calibration=one)
    assert card.calibration_for(single_volume=True) == ("single_volume_calibration", one)
    assert card.calibration_for(single_volume=False) == ("case_calibration", three)
    only_three = dataclasses.replace(card, single_volume_calibration=None)
    assert only_three.calibration_for(single_volume=True) == ("case_calibration", three)  # older cards: as before
    assert dataclasses.replace(only_three, case_calibration=None).calibration_for(True) == (None, None)
    assert load_bundle(save_bundle(net, card, tmp_path / "b")).card.single_volume_calibration == one


def test_changelog_round_trips_and_must_be_lines(tmp_path):
    net = UMLNet(UMLConfig())
    card = dataclasses.replace(make_card(net.config), changelog={"0.0.2": "second", "0.0.1": "first"})
    assert load_bundle(save_bundle(net, card, tmp_path / "b")).card.changelog == {"0.0.2": "second", "0.0.1": "first"}
    with pytest.raises(BundleError, match="changelog"):
        dataclasses.replace(card, changelog={"0.0.1": ["first"]})


def test_the_shipped_card_is_schema_2_and_its_schema_1_form_migrates_to_it():
    v2 = json.loads(SHIPPED.read_text())
    assert v2["schema_version"] == SCHEMA_VERSION == 2
    shipped = card_from_dict(v2)
    assert shipped.reader.stacking == COEFFICIENTS and shipped.case_calibration is None and shipped.changelog
    old = shipped_as_schema_1()
    migrated = card_from_dict(old)
    assert migrated == dataclasses.replace(shipped, changelog={})
    assert old["schema_version"] == 1 and "weight" in old["reader"]  # the caller's dict is left alone


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d.update(test_time_augmentation="flip_w"), "mirrored test-time augmentation"),
    (lambda d: d.update(refiner={"width": 8}), "refiner"),
    (lambda d: d["reader"].update(fusion="evidence"), "reader setting fusion"),
    (lambda d: d["reader"].update(weight=0.5), "reader setting weight"),
    (lambda d: d["reader"].update(opinion_reads="filtered"), "reader setting opinion_reads"),
    (lambda d: d["reader"].update(test_time_augmentation="none"), "reader setting test_time_augmentation"),
    (lambda d: d["reader"].update(segmentation_min_lesion=None), "does not check the segmentation"),
    (lambda d: d.update(case_calibration={"slope": 0.8, "intercept": 0.1}), "case_calibration on top of"),
    (lambda d: d.update(case_calibration="identity"), "case_calibration on top of"),
])
def test_schema_1_cards_with_removed_modes_are_refused_with_the_field(change, fragment):
    d = shipped_as_schema_1()
    change(d)
    with pytest.raises(BundleError, match=f"schema-1 card that uses .*{fragment}.*removed in schema 2: retrain or refit"):
        card_from_dict(d, "old/model.json")


def test_a_schema_1_card_without_a_reader_keeps_its_calibration():
    d = shipped_as_schema_1()
    d["reader"] = None
    d["case_calibration"] = {"slope": 0.8, "intercept": 0.1}
    card = card_from_dict(d)
    assert card.reader is None and card.case_calibration == {"slope": 0.8, "intercept": 0.1}
    assert migrate_v1(copy.deepcopy(d))["schema_version"] == 2


@pytest.mark.parametrize("version", [0, 3, None, "2", True])
def test_other_schema_versions_and_unknown_fields_are_refused(version):
    d = json.loads(SHIPPED.read_text())
    d["schema_version"] = version
    with pytest.raises(BundleError, match="reads schema_version 1 and 2"):
        card_from_dict(d)
    d = json.loads(SHIPPED.read_text())
    d["refiner"] = None  # a schema-1 field in a schema-2 card
    with pytest.raises(BundleError, match=r"unknown field\(s\) \['refiner'\]"):
        card_from_dict(d)


PICTURE = dict(channels=("red", "green", "blue"), kind="picture", target_size=(256, 256))


def test_a_picture_card_round_trips_and_a_volume_card_is_the_default(tmp_path):
    assert (InputSpec().kind, InputSpec().target_size) == ("volume", None)
    net = UMLNet(UMLConfig())
    card = make_card(net.config, input=InputSpec(**PICTURE))
    d = json.loads(json.dumps(card.to_dict("0" * 64)))  # as model.json holds it
    assert d["input"]["kind"] == "picture" and d["input"]["target_size"] == [256, 256]
    assert card_from_dict(d) == card
    assert load_bundle(save_bundle(net, card, tmp_path / "b")).card.input == card.input
    assert InputSpec(target_size=(32, 48)).target_size == (32, 48)  # a volume model may resize its slices too


@pytest.mark.parametrize("change, fragment", [
    ({"kind": "photo"}, "input.kind must be 'volume' or 'picture', got 'photo'"),
    ({"target_size": (7, 64)}, "input.target_size must be null or \\[rows, columns\\], two integers of at least 8"),
    ({"target_size": (64,)}, "input.target_size must be null"),
    ({"target_size": (64.0, 64)}, "input.target_size must be null"),
    ({"target_size": (True, 64)}, "input.target_size must be null"),
    ({"target_spacing": (1.0, 1.0)}, "input.target_size and input.target_spacing are both set"),
    ({"slicing_axis": "coronal"}, "input.slicing_axis is 'coronal' but a picture model .* set input.slicing_axis to 'axial'"),
    ({"context_slices": 1}, "input.context_slices is 1 but a picture model .* set input.context_slices to 0"),
    ({"motion_correction": MotionCorrection("translation", "red")},
     "input.motion_correction.mode is 'translation' but a picture model .* to 'none'"),
])
def test_picture_and_target_size_fields_are_checked(change, fragment):
    with pytest.raises(BundleError, match=fragment):
        InputSpec(**{**PICTURE, **change})


def test_a_bad_target_size_in_model_json_is_refused_with_the_field():
    d = make_card(UMLConfig(), input=InputSpec(**PICTURE)).to_dict("0" * 64)
    d["input"]["target_size"] = [256, "wide"]
    with pytest.raises(BundleError, match="input.target_size must be null"):
        card_from_dict(d)


def test_a_card_written_before_the_input_fields_existed_loads_as_a_volume_card(tmp_path):
    """The shipped card without ``input.kind``, ``target_size``, ``modality`` and ``body_region`` (as 1.12.0 was
    written), resealed: a volume card with no declared modality."""
    import shutil

    raw = json.loads(SHIPPED.read_text())
    assert card_digest(raw) == raw["weights"]["card_sha256"] and raw["input"]["modality"] == "MR"
    for key in ("kind", "target_size", "modality", "body_region"):
        raw["input"].pop(key)
    raw["weights"]["card_sha256"] = card_digest(raw)
    old = tmp_path / "old"
    shutil.copytree(SHIPPED.parent, old)
    (old / "model.json").write_text(json.dumps(raw))
    card = load_bundle(old).card
    assert card.input.kind == "volume" and card.input.target_size is None and card.input.modality is None
