"""Model bundles as the module sees them (torch-free card reader, full validation, listing, resolving)."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from umlslicer_helpers import LESION_COLOR, LESION_TERMINOLOGY

from UMLSegmentationLib import logic as logic_module
from UMLSegmentationLib import models
from UMLSegmentationLib.errors import InputError
from UMLSegmentationLib.logic import UMLSegmentationLogic
from UMLSegmentationLib.paths import moduleDirectory, umlcorePythonPath


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No shipped and no user models: only what a test puts in ``tmp_path / 'user'``."""
    monkeypatch.setattr(models, "shippedModelDirectories", lambda: [])
    monkeypatch.setattr(models, "userModelDirectory", lambda: tmp_path / "user")
    return tmp_path / "user"


def test_read_model_info_matches_the_card(bundle_dir, tmp_path):
    from umlcore.bundle import read_card

    card, sha = read_card(bundle_dir)
    for path in (bundle_dir, bundle_dir / "model.json"):
        info = models.readModelInfo(path)
        assert (info.id, info.version, info.name, info.task) == (card.id, card.version, card.name, card.task)
        assert info.classes == card.classes and info.channels == card.input.channels
        assert info.sha256 == sha and info.reviewUncertainty == card.review_uncertainty
        assert info.positiveClass == card.positive_class and not info.isColour
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
    (card_2_5d / "model.json").write_text(json.dumps(data))
    assert models.readModelInfo(card_2_5d).contextSlices == 1


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("segments"), r"missing required field\(s\) \['segments'\]"),
    (lambda c: c.update(segments=[{"label": 0, "name": "bg"}]), r"segment labels \[0\] must be distinct integers in 1..255"),
    (lambda c: c.update(segments=[{"label": 1, "name": "x", "color": [2, 0, 0]}]), r"segment colour \[2, 0, 0\] is not three numbers in 0..1"),
    (lambda c: c["weights"].pop("sha256"), r"lacks weights.sha256"),
    (lambda c: c.update(classes=["only one"]), r"needs at least two classes"),
    (lambda c: c.update(input={"channels": []}), r"input.channels is empty"),
])
def test_invalid_cards_are_refused_with_the_fix(bundle_dir, tmp_path, edit, match):
    card = json.loads((bundle_dir / "model.json").read_text())
    edit(card)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps(card))
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


def test_list_and_resolve_models(isolated, bundle_dir, rgb_bundle_dir, tmp_path):
    with pytest.raises(InputError, match="no model given and no UML model is installed"):
        models.resolveModel(None)
    isolated.mkdir()
    shutil.copytree(bundle_dir, isolated / "a-model")
    (isolated / "broken").mkdir()
    (isolated / "broken" / "model.json").write_text("{}")
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copytree(rgb_bundle_dir, extra / "rgb")
    entries = models.listModels([extra])
    assert [(e.path.name, e.info.id if e.info else None, e.shipped) for e in entries] == [
        ("a-model", "uml-test-small", False), ("broken", None, False), ("rgb", "uml-test-rgb", False)]
    assert "schema_version" in entries[1].error
    assert models.resolveModel("uml-test-rgb", [extra]).isColour
    assert models.resolveModel(None, [extra]).id == "uml-test-small"  # no default id installed: the first usable
    assert models.resolveModel(str(extra / "rgb")).id == "uml-test-rgb"
    with pytest.raises(InputError, match=r"no model with id 'nope' \(known: uml-test-small, uml-test-rgb\)"):
        models.resolveModel("nope", [extra])


def test_the_engine_and_module_paths():
    assert (umlcorePythonPath() / "umlcore" / "__main__.py").is_file()
    assert (moduleDirectory() / "UMLSegmentation.py").is_file()


def test_missing_engine_packages_are_named_with_the_fix(monkeypatch, mrml, bundle_dir):
    from umlslicer_helpers import add_volume

    monkeypatch.setitem(logic_module.ENGINE_PACKAGES, "uml_no_such_module", "uml-no-such-package")
    logic = UMLSegmentationLogic()
    assert logic.missingPythonPackages() == ["uml-no-such-package"]
    with pytest.raises(InputError, match=r"uml-no-such-package missing for the UML engine: run slicer.util.pip_install\('uml-no-such-package'\)"):
        logic.process(add_volume(), model=bundle_dir)
