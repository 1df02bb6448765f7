"""umlcore.bundle: save and load, bit-identical round trips, zips, tampering, refusals."""

import json

import pytest
import torch

from umlcore.bundle import CARD_FILE, WEIGHTS_FILE, load_bundle, read_card, save_bundle
from umlcore.card import InputSpec, ModelCard, Segment, card_digest
from umlcore.config import UMLConfig
from umlcore.errors import BundleError
from umlcore.network import UMLNet


def make_card(cfg, input=InputSpec()):
    return ModelCard(
        id="test-model", version="0.0.1", name="Test", task="test",
        classes=("negative", "positive"),
        segments=(Segment(1, "Lesion", (1.0, 0.5, 0.0), {"type": {"scheme": "SCT", "code": "52988006", "meaning": "Lesion"}}),),
        input=input, architecture=cfg,
    )


@pytest.fixture
def bundle_dir(tmp_path):
    torch.manual_seed(0)
    net = UMLNet(UMLConfig())
    return save_bundle(net, make_card(net.config), tmp_path / "bundle"), net


def test_round_trip_gives_bit_identical_outputs(bundle_dir):
    path, net = bundle_dir
    loaded = load_bundle(path)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        a, b = net(x), loaded.model(x)
    assert torch.equal(a.seg_alpha, b.seg_alpha) and torch.equal(a.cls_alpha, b.cls_alpha)
    assert loaded.card == make_card(net.config)


def test_zip_bundle_loads(bundle_dir, tmp_path):
    import shutil

    path, _ = bundle_dir
    archive = shutil.make_archive(str(tmp_path / "zipped"), "zip", path)
    assert load_bundle(archive).card.id == "test-model"


def test_tampered_weights_are_refused(bundle_dir):
    path, _ = bundle_dir
    w = path / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the sha256"):
        load_bundle(path)


def test_unknown_schema_version_is_refused(bundle_dir):
    path, _ = bundle_dir
    card = json.loads((path / CARD_FILE).read_text())
    card["schema_version"] = 99
    (path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="schema_version 99"):
        load_bundle(path)


@pytest.mark.parametrize("field", ["id", "architecture", "weights", "segments"])
def test_missing_fields_are_refused(bundle_dir, field):
    path, _ = bundle_dir
    card = json.loads((path / CARD_FILE).read_text())
    del card[field]
    (path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(BundleError, match=f"missing required field\\(s\\) \\['{field}'\\]"):
        read_card(path)


def test_weights_of_another_architecture_are_refused(bundle_dir):
    path, _ = bundle_dir
    card = json.loads((path / CARD_FILE).read_text())
    card["architecture"]["cls_head_width"] = 32
    card["weights"]["card_sha256"] = card_digest(card)  # resealed: the weights check is reached
    (path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="do not fit the declared architecture"):
        load_bundle(path)


def test_missing_and_non_bundle_paths(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    f = tmp_path / "weights.bin"
    f.write_bytes(b"123")
    with pytest.raises(BundleError, match="is not a model bundle"):
        load_bundle(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="has no model.json"):
        load_bundle(tmp_path / "empty")


def test_save_refuses_to_overwrite(bundle_dir):
    path, net = bundle_dir
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(net, make_card(net.config), path)


def test_saving_the_same_weights_twice_gives_the_same_hash(bundle_dir, tmp_path):
    path, net = bundle_dir
    again = save_bundle(net, make_card(net.config), tmp_path / "again")
    assert (again / WEIGHTS_FILE).read_bytes() == (path / WEIGHTS_FILE).read_bytes()


def test_context_slices_multiply_the_network_channels_and_round_trip(tmp_path):
    spec = InputSpec(context_slices=1)
    assert spec.network_channels == 9 and InputSpec().network_channels == 3
    config = UMLConfig(in_channels=9)
    net = UMLNet(config)
    path = save_bundle(net, make_card(config, input=spec), tmp_path / "b25d")
    card = load_bundle(path).card
    assert card.input.context_slices == 1 and card.architecture.in_channels == 9
    with pytest.raises(BundleError, match=r"names 3 channels at 3 slices each \(9 in all\) but the architecture takes 3"):
        make_card(UMLConfig(), input=spec)




def test_a_card_with_nan_is_refused_before_anything_is_written(bundle_dir, tmp_path):
    import dataclasses

    path, net = bundle_dir
    card = dataclasses.replace(make_card(net.config), metrics={"dice_mean": float("nan")})
    with pytest.raises(BundleError, match="NaN or infinite"):
        save_bundle(net, card, tmp_path / "nan")
    assert not (tmp_path / "nan").exists() and [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_a_card_edited_after_export_is_refused_and_the_summary_names_the_card(bundle_dir, make_volume):
    from umlcore.predictor import Predictor

    path, _ = bundle_dir
    bundle = load_bundle(path)
    summary = Predictor(bundle, device="cpu").predict(make_volume()).summary
    assert summary["model"]["card_sha256"] == bundle.card_sha256 == json.loads((path / CARD_FILE).read_text())["weights"]["card_sha256"]
    card = json.loads((path / CARD_FILE).read_text())
    card["review_uncertainty"] = 0.99  # the weights untouched
    (path / CARD_FILE).write_text(json.dumps(card, indent=2))
    for load in (load_bundle, read_card):
        with pytest.raises(BundleError, match="model.json was changed after the bundle was exported"):
            load(path)
    del card["weights"]["card_sha256"]  # a schema-2 card must carry its seal
    (path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="was changed after the bundle was exported"):
        load_bundle(path)


def test_a_zip_is_checked_before_it_is_unpacked_and_errors_name_the_zip(bundle_dir, tmp_path, monkeypatch):
    import zipfile

    import umlcore.bundle as bundle_module

    path, _ = bundle_dir
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in (CARD_FILE, WEIGHTS_FILE):
            zf.write(path / name, f"bundle/{name}")
    monkeypatch.setattr(bundle_module, "MAX_WEIGHTS_BYTES", 100_000)  # the weights (~1.8 MB) are now "too large"
    monkeypatch.setattr(bundle_module.tempfile, "TemporaryDirectory", _refuse_extraction)
    with pytest.raises(BundleError, match=f"{archive} holds a model.safetensors of .* GB, more than the 0 MB"):
        load_bundle(archive)
    # a zip whose listing lies about a member's size is stopped while unpacking, and names the zip
    monkeypatch.undo()
    with zipfile.ZipFile(archive) as zf:
        with pytest.raises(BundleError, match=f"{archive} holds a model.safetensors larger than the 0 MB"):
            bundle_module._extract(zf, zf.getinfo(f"bundle/{WEIGHTS_FILE}"), tmp_path / "x", 1000, str(archive))


def _refuse_extraction(*args, **kwargs):
    raise AssertionError("a bundle too large was unpacked")
