"""``UMLSegmentationLib.models``: bundles as the module sees them (torch-free card reader, full validation,
listing, resolving)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile

import pytest

from UMLSegmentationLib import models
from UMLSegmentationLib.errors import InputError

from .umlslicer_helpers import LESION_COLOR, LESION_TERMINOLOGY, REPO, add_volume, sealed


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No shipped and no user models: only what a test puts in ``tmp_path / 'user'``."""
    monkeypatch.setattr(models, "shippedModelDirectories", lambda: [])
    monkeypatch.setattr(models, "userModelDirectory", lambda: tmp_path / "user")
    return tmp_path / "user"


def test_read_model_info_matches_the_card(bundle_dir, tmp_path):
    from umlcore.bundle import read_card

    card, sha = read_card(bundle_dir)
    assert json.loads((bundle_dir / "model.json").read_text())["schema_version"] == models.SCHEMA_VERSION == 2
    for path in (bundle_dir, bundle_dir / "model.json"):
        info = models.readModelInfo(path)
        assert (info.id, info.version, info.name, info.task) == (card.id, card.version, card.name, card.task)
        assert info.classes == card.classes and info.channels == card.input.channels
        assert info.sha256 == sha and info.reviewUncertainty == card.review_uncertainty
        assert info.positiveClass == card.positive_class and not info.isPicture
        assert (info.kind, info.targetSize, info.slicingAxis, info.acceptedChannelCounts) == ("volume", None, "axial", (1, 3))
        assert info.contextSlices == card.input.context_slices == 0
        (segment,) = info.segments
        assert (segment.label, segment.name, segment.color) == (1, "Lesion", LESION_COLOR)
        assert segment.terminology == LESION_TERMINOLOGY
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in bundle_dir.iterdir():
            zf.write(f, f"uml-test-small/{f.name}")
    assert models.readModelInfo(archive).id == card.id
    card_2_5d = tmp_path / "b25d"  # a 2.5D card: the module reads its context (shown beside the inputs)
    shutil.copytree(bundle_dir, card_2_5d)
    data = json.loads((card_2_5d / "model.json").read_text())
    data["input"]["context_slices"] = 1
    (card_2_5d / "model.json").write_text(json.dumps(sealed(data)))
    assert models.readModelInfo(card_2_5d).contextSlices == 1


def test_a_picture_card_reads(picture_model_dir):
    """A picture model's card: what it reads (kind, size) and how many colours it takes (RGB, or grey replicated)."""
    from umlcore.bundle import read_card

    card, _ = read_card(picture_model_dir)
    info = models.readModelInfo(picture_model_dir)
    assert card.input.kind == "picture" and info.isPicture and info.kind == "picture"
    assert info.targetSize == card.input.target_size == (32, 32)
    assert info.channels == ("red", "green", "blue") and info.acceptedChannelCounts == (1, 3)
    assert dataclasses.replace(info, minChannels=3).acceptedChannelCounts == (3,)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("segments"), r"missing required field\(s\) \['segments'\]"),
    (lambda c: c.update(segments=[{"label": 0, "name": "bg"}]), r"segment labels \[0\] must be distinct integers in 1..255"),
    (lambda c: c.update(segments=[{"label": 1, "name": "x", "color": [2, 0, 0]}]), r"segment colour \[2, 0, 0\] is not three numbers in 0..1"),
    (lambda c: c["weights"].pop("sha256"), r"lacks weights.sha256"),
    (lambda c: c.update(classes=["only one"]), r"needs at least two classes"),
    (lambda c: c.update(input={"channels": []}), r"input.channels is empty"),
    (lambda c: c["input"].update(kind="movie"), r"input.kind 'movie' is not one of \['volume', 'picture'\]"),
    (lambda c: c["input"].update(slicing_axis="oblique"), r"input.slicing_axis 'oblique' is not one of"),
    (lambda c: c["input"].update(target_size=[32]), r"input.target_size \[32\] is not \[rows, columns\]"),
])
def test_invalid_cards_are_refused_with_the_fix(bundle_dir, tmp_path, edit, match):
    card = json.loads((bundle_dir / "model.json").read_text())
    edit(card)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps(sealed(card)))  # sealed: refused for what it holds, not as edited
    with pytest.raises(InputError, match=match) as info:
        models.readModelInfo(bad)
    assert "re-export the bundle" in str(info.value)


def test_validate_model_checks_the_weights(bundle_dir, tmp_path, monkeypatch):
    assert models.validateModel(bundle_dir).id == "uml-test-small"
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle_dir, tampered)
    data = bytearray((tampered / "model.safetensors").read_bytes())
    data[100] ^= 0x01
    (tampered / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match the sha256"):
        models.validateModel(tampered)
    # without torch (Slicer before PyTorch is installed) the hash is still checked, with the standard library
    monkeypatch.setattr(models, "_moduleAvailable", lambda name: False)
    assert models.validateModel(bundle_dir).id == "uml-test-small"
    with pytest.raises(InputError, match="does not match the sha256"):
        models.validateModel(tampered)
    (tampered / "model.safetensors").unlink()
    with pytest.raises(InputError, match="has no model.safetensors"):
        models.validateModel(tampered)


def test_list_and_resolve_models(isolated, bundle_dir, picture_model_dir, tmp_path):
    with pytest.raises(InputError, match="no model given and no UML model is installed"):
        models.resolveModel(None)
    isolated.mkdir()
    shutil.copytree(bundle_dir, isolated / "a-model")
    (isolated / "broken").mkdir()
    (isolated / "broken" / "model.json").write_text("{}")
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copytree(picture_model_dir, extra / "pictures")
    entries = models.listModels([extra])
    assert [(e.path.name, e.info.id if e.info else None, e.shipped) for e in entries] == [
        ("a-model", "uml-test-small", False), ("broken", None, False), ("pictures", "uml-test-picture", False)]
    assert "schema_version" in entries[1].error
    assert models.resolveModel("uml-test-picture", [extra]).isPicture
    assert models.resolveModel(None, [extra]).id == "uml-test-small"  # no default id installed: the first usable
    assert models.resolveModel(str(extra / "pictures")).id == "uml-test-picture"
    with pytest.raises(InputError, match=r"no model with id 'nope' \(known: uml-test-small, uml-test-picture\)"):
        models.resolveModel("nope", [extra])


def test_the_shipped_card_reads():
    """The shipped default model's card (schema 2, with a reader and a changelog) reads without torch."""
    (entry,) = [e for e in models.listModels() if e.shipped and e.path.name == models.DEFAULT_MODEL_ID]
    assert entry.error is None and entry.path == REPO / "Resources" / "Models" / models.DEFAULT_MODEL_ID
    info = entry.info
    card = json.loads((entry.path / "model.json").read_text())
    assert card["schema_version"] == 2 and card["reader"] is not None and card["changelog"]
    assert (info.id, info.version, info.channels) == (card["id"], card["version"], ("pre", "early", "late"))
    assert [s.name for s in info.segments] == ["Lesion"] and info.sha256 == card["weights"]["sha256"]
    assert card["weights"]["card_sha256"] == models.cardDigest(card)  # sealed, and the seal checked without torch
    assert models.resolveModel(None).id == models.DEFAULT_MODEL_ID


EDITED = r"model.json was changed after the bundle was exported \(it no longer matches weights.card_sha256\): " \
         r"restore the original card, or re-export the bundle with python -m training.export"


def _edit_name(card):
    card["segments"][0]["name"] = "Tumour"


@pytest.mark.parametrize("edit", [
    _edit_name,
    lambda c: c.update(review_uncertainty=0.9),  # a looser verdict threshold: the edit that matters most
    lambda c: c["input"].update(channels=["early", "pre", "late"]),
    lambda c: c.update(review_uncertainty=float("nan")),
    lambda c: c["weights"].pop("card_sha256"),  # the seal removed
    lambda c: c["weights"].update(card_sha256="0" * 64),
    lambda c: c["weights"].update(card_sha256=None),
], ids=["segment-name", "review-uncertainty", "channels", "nan", "no-seal", "wrong-seal", "null-seal"])
def test_a_card_edited_after_export_is_refused(isolated, bundle_dir, tmp_path, edit):
    """A schema-2 card whose own hash (weights.card_sha256) no longer matches it is an unusable bundle: listed with
    the reason, refused by the card reader, resolve and process, folder or zip alike."""
    from umlcore.card import card_digest

    card = json.loads((bundle_dir / "model.json").read_text())
    assert card["weights"]["card_sha256"] == models.cardDigest(card) == card_digest(card)  # the two implementations agree
    isolated.mkdir()
    edited = isolated / "edited"
    shutil.copytree(bundle_dir, edited)
    edit(card)
    (edited / "model.json").write_text(json.dumps(card, indent=2))
    for path in (edited, edited / "model.json"):
        with pytest.raises(InputError, match=EDITED):
            models.readModelInfo(path)
    archive = tmp_path / "edited.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in edited.iterdir():
            zf.write(f, f"edited/{f.name}")
    with pytest.raises(InputError, match=EDITED):
        models.readModelInfo(archive)
    (entry,) = models.listModels()
    assert entry.info is None and entry.path == edited and "was changed after the bundle was exported" in entry.error
    with pytest.raises(InputError, match=r"no model with id 'uml-test-small' \(known: none installed\)"):
        models.resolveModel("uml-test-small")


def test_a_resealed_or_schema_1_card_is_not_refused_as_edited(bundle_dir, tmp_path):
    """The seal covers the whole card but the weights section, in a canonical form: layout does not matter, an
    exporter that re-seals makes an edit legitimate, and a schema-1 card has no seal to check."""
    card = json.loads((bundle_dir / "model.json").read_text())
    relaid = tmp_path / "relaid"  # the same card, keys reordered and indented: same seal
    relaid.mkdir()
    (relaid / "model.json").write_text(json.dumps(dict(reversed(list(card.items()))), indent=4))
    assert models.readModelInfo(relaid).id == card["id"]
    _edit_name(card)
    resealed = tmp_path / "resealed"
    resealed.mkdir()
    (resealed / "model.json").write_text(json.dumps(sealed(card)))
    assert models.readModelInfo(resealed).segments[0].name == "Tumour"
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "model.json").write_text(json.dumps({**card, "schema_version": 1}))  # edited, stale seal: not checked
    assert models.readModelInfo(v1).segments[0].name == "Tumour"


def test_process_refuses_a_card_edited_after_export(check_refused, bundle_dir, tmp_path, monkeypatch):
    """Refused by the module's card reader, before any engine process starts (not only by the engine)."""
    edited = tmp_path / "edited"
    shutil.copytree(bundle_dir, edited)
    card = json.loads((edited / "model.json").read_text())
    card["review_uncertainty"] = 0.9
    (edited / "model.json").write_text(json.dumps(card))
    node = add_volume()

    def run(logic):
        try:
            logic.process(node, model=edited, device="cpu")
        finally:
            assert logic.engines.starts == 0, "an engine process was started for an edited card"

    check_refused(run, EDITED)


@pytest.mark.parametrize("version", [1, 2])
def test_cards_of_both_schema_versions_read_the_same(bundle_dir, tmp_path, version):
    """A schema-1 card (which umlcore migrates) gives the module the same fields as the schema-2 card."""
    card = json.loads((bundle_dir / "model.json").read_text())
    folder = tmp_path / f"schema{version}"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({**card, "schema_version": version}))
    assert models.readModelInfo(folder) == dataclasses.replace(models.readModelInfo(bundle_dir), path=folder)


@pytest.mark.parametrize("version", [0, 3, 99, "2", None, True])
def test_other_schema_versions_are_refused(bundle_dir, tmp_path, version):
    card = json.loads((bundle_dir / "model.json").read_text())
    card["schema_version"] = version
    if version is None:
        del card["schema_version"]
    folder = tmp_path / "card"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match=rf"has schema_version {version!r}; this module reads schema_version 1 and 2: "
                                         r"re-export the bundle with python -m training\.export") as info:
        models.readModelInfo(folder)
    assert str(info.value).endswith("or update the UML extension")


def test_invalid_model_files_are_refused_by_process(check_refused, bundle_dir, tmp_path):
    node = add_volume()
    check_refused(lambda logic: logic.process(node, model=tmp_path / "nowhere"), r"does not exist")
    not_a_bundle = tmp_path / "folder"
    not_a_bundle.mkdir()
    check_refused(lambda logic: logic.process(node, model=not_a_bundle), r"is not a UML model bundle \(no model.json\)")
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    (broken / "model.json").write_text("{ not json")
    check_refused(lambda logic: logic.process(node, model=broken), r"is not valid JSON")
    card = json.loads((bundle_dir / "model.json").read_text())
    wrong_schema = tmp_path / "schema"
    shutil.copytree(bundle_dir, wrong_schema)
    (wrong_schema / "model.json").write_text(json.dumps({**card, "schema_version": 99}))
    check_refused(lambda logic: logic.process(node, model=wrong_schema), r"schema_version 99")
    check_refused(lambda logic: logic.process(node, model="no-such-model-id"), r"no model with id 'no-such-model-id'")
