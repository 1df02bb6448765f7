"""The lesion refiner: its card section, crops, the redrawing rule, the bundle and the predictor step."""

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
from umlcore.predictor import Predictor
from umlcore.reader import LesionReader, ReaderConfig
from umlcore.refiner import (LesionRefiner, RefinerConfig, component_boxes, crop_box, crop_inputs, cut_crop, refine_labels,
                             touching)


def test_config_defaults_and_validation():
    cfg = RefinerConfig(crop=[8, 16, 16], margin=[1, 2, 2])
    assert cfg.crop == (8, 16, 16) and cfg.margin == (1, 2, 2) and cfg.threshold == 0.5
    for bad, message in [(dict(crop=(7, 16, 16)), "crop must be"), (dict(crop=(8, 18, 16)), "crop must be"),
                         (dict(margin=(6, 2, 2)), "leaves no room"), (dict(margin=(-1, 2, 2)), "margin must be"),
                         (dict(threshold=1.0), "threshold must be"), (dict(width=0), "width must be"),
                         (dict(max_components=0), "max_components must be")]:
        with pytest.raises(BundleError, match=message):
            RefinerConfig(**bad)


def test_an_untrained_refiner_returns_the_networks_probability():
    torch.manual_seed(0)
    net = LesionRefiner(5, width=4)
    x = torch.rand(2, 5, 4, 8, 8)
    p = torch.sigmoid(net(x))
    assert p.shape == (2, 1, 4, 8, 8)
    torch.testing.assert_close(p, x[:, 3:4].clamp(1e-4, 1 - 1e-4), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least 3"):
        LesionRefiner(2)


def test_crops_are_zero_beyond_the_volume():
    a = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    box = crop_box((0, 2, 4), (2, 4, 4))
    assert box == (slice(-1, 1), slice(0, 4), slice(2, 6))
    c = cut_crop(a, box)
    assert c.shape == (2, 2, 4, 4)
    assert (c[:, 0] == 0).all() and (c[..., 3] == 0).all()
    np.testing.assert_array_equal(c[:, 1, :, :3], a[:, 0, :, 2:5])
    assert cut_crop(a, crop_box((10, 10, 10), (2, 2, 2))).max() == 0  # wholly outside


def test_component_boxes_skip_what_does_not_fit_and_come_largest_first():
    labels = np.zeros((6, 40, 40), np.uint8)
    labels[1:3, 2:5, 2:5] = 1  # 18 voxels
    labels[2:5, 20:26, 20:26] = 1  # 108 voxels
    labels[0:6, 30:40, 0:30] = 1  # too wide for a 16-column crop
    cfg = RefinerConfig(crop=(8, 16, 16), margin=(1, 2, 2))
    components, boxes = component_boxes(labels, cfg)
    assert len(boxes) == 2 and components.max() == 3
    (big, big_box), (small, small_box) = boxes
    assert (components == big).sum() == 108 and (components == small).sum() == 18
    assert big_box == (slice(-1, 7), slice(15, 31), slice(15, 31))  # centred on the box's middle voxel (3, 23, 23)
    assert small_box == crop_box((2, 3, 3), (8, 16, 16))
    assert len(component_boxes(labels, dataclasses.replace(cfg, max_components=1))[1]) == 1


def test_refine_labels_replaces_each_component_by_what_touches_it():
    labels = np.zeros((6, 32, 32), np.uint8)
    labels[2:4, 10:14, 10:14] = 1
    fg = np.full(labels.shape, 0.01, np.float32)
    fg[1:5, 8:16, 8:16] = 0.9  # the network's probability: larger than the labelmap
    fg[2:4, 24:28, 24:28] = 0.9  # a separate blob in the crop that touches no component: not added
    stack = np.zeros((6, 3, 32, 32), np.float32)
    cfg = RefinerConfig(crop=(8, 32, 32), margin=(1, 2, 2))
    net = LesionRefiner(5, width=4).eval()  # untrained: its probability is fg's
    out, n = refine_labels(net, cfg, stack, fg, labels)
    assert n == 1 and out.dtype == np.uint8 and (labels[2:4, 10:14, 10:14] == 1).all()  # input untouched
    np.testing.assert_array_equal(out, (fg == 0.9) & (np.arange(32)[None, None, :] < 20))
    # a refiner that erases everything leaves the component as it was
    with torch.no_grad():
        net.out.bias.fill_(-20.0)
    out, n = refine_labels(net, cfg, stack, fg, labels)
    assert n == 0
    np.testing.assert_array_equal(out, labels)
    x = crop_inputs(stack, fg, labels > 0, crop_box((2, 11, 11), cfg.crop))
    assert x.shape == (5, 8, 32, 32) and x[3].max() == pytest.approx(0.9) and x[4].sum() == 32


@pytest.fixture(scope="module")
def refiner_bundle_dir(tiny_bundle, tmp_path_factory):
    """The tiny bundle with an untrained refiner and a reader that reads every patch as a lesion."""
    torch.manual_seed(1)
    reader = LesionReader(9, width=4)
    with torch.no_grad():
        reader.head.bias.copy_(torch.tensor([8.0, 0.0, -1.0]))
    refiner = LesionRefiner(5, width=4)
    card = dataclasses.replace(tiny_bundle.card, reader=ReaderConfig(width=4, patch_size=16),
                               refiner=RefinerConfig(width=4, crop=(8, 16, 16), margin=(1, 2, 2),
                                                     training={"note": "test"}))
    return save_bundle(tiny_bundle.model, card, tmp_path_factory.mktemp("refiner") / "bundle", reader=reader,
                       refiner=refiner)


def test_bundle_round_trips_the_refiner(refiner_bundle_dir, tiny_bundle, tmp_path):
    b = load_bundle(refiner_bundle_dir)
    assert b.card.refiner == RefinerConfig(width=4, crop=(8, 16, 16), margin=(1, 2, 2), training={"note": "test"})
    assert isinstance(b.refiner, LesionRefiner) and not b.refiner.training
    card = json.loads((refiner_bundle_dir / CARD_FILE).read_text())
    assert card["refiner"]["crop"] == [8, 16, 16]
    with pytest.raises(BundleError, match="give a refiner exactly when"):
        save_bundle(b.model, b.card, tmp_path / "x", reader=b.reader)
    no_section = tmp_path / "a"
    shutil.copytree(refiner_bundle_dir, no_section)
    card["refiner"] = None
    (no_section / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="refiner.* tensors but no refiner section"):
        load_bundle(no_section)
    no_weights = tmp_path / "b"
    shutil.copytree(refiner_bundle_dir, no_weights)
    state = {k: v for k, v in load_file(str(no_weights / WEIGHTS_FILE)).items() if not k.startswith("refiner.")}
    save_file(state, str(no_weights / WEIGHTS_FILE))
    card = json.loads((no_weights / CARD_FILE).read_text())
    card["weights"]["sha256"] = sha256_file(no_weights / WEIGHTS_FILE)
    (no_weights / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="do not fit"):
        load_bundle(no_weights)


@pytest.fixture(scope="module")
def boxed(refiner_bundle_dir, box_segmentation):
    """The refiner bundle whose network segments a fixed 10 x 12 box in every slice but the first."""
    return box_segmentation(load_bundle(refiner_bundle_dir))


def test_predictor_redraws_the_components_of_multi_phase_inputs(boxed, make_volume):
    volume = make_volume(size=(48, 40, 6), spacing=(0.8, 0.6, 2.0))
    plain = Predictor(dataclasses.replace(boxed, card=dataclasses.replace(boxed.card, refiner=None), refiner=None),
                      device="cpu").predict([volume] * 3)
    same = Predictor(boxed, device="cpu").predict([volume] * 3)  # untrained: the network's own drawing
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same.labelmap), sitk.GetArrayFromImage(plain.labelmap))
    assert same.summary["postprocessing"]["components_refined"] == 1
    assert plain.summary["postprocessing"]["components_refined"] is None
    grow = load_bundle(boxed.path)
    with torch.no_grad():
        grow.refiner.out.bias.fill_(20.0)  # every voxel of the crop is lesion
    grown = Predictor(dataclasses.replace(boxed, refiner=grow.refiner), device="cpu").predict([volume] * 3)
    expected = np.zeros((6, 40, 48), np.uint8)
    expected[0:6, 7:23, 18:34] = 1  # the (8, 16, 16) crop centred on the box (slices 1-5, rows 10-19, columns 20-31)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(grown.labelmap), expected)
    assert grown.summary["segments"][0]["voxel_count"] == 6 * 16 * 16
    assert grown.summary["classification"] == plain.summary["classification"]  # read before the refiner
    assert [l["voxel_count"] for l in plain.summary["lesions"]] == [5 * 10 * 12]
    assert [l["voxel_count"] for l in grown.summary["lesions"]] == [6 * 16 * 16]  # the component as written
    one = Predictor(dataclasses.replace(boxed, refiner=grow.refiner), device="cpu").predict(volume)
    assert one.summary["postprocessing"]["components_refined"] is None
    assert sitk.GetArrayFromImage(one.labelmap).sum() == 5 * 10 * 12  # one volume: not redrawn


def test_uml_info_describes_the_refiner(refiner_bundle_dir, capsys):
    from umlcore.cli import main

    assert main(["info", str(refiner_bundle_dir)]) == 0
    text = capsys.readouterr().out
    params = sum(p.numel() for p in LesionRefiner(5, width=4).parameters())
    assert (f"refiner:       {params:,} parameters, redraws in 3D the 8 largest labelmap components that fit a "
            "8 x 16 x 16 voxel crop") in text
    assert main(["info", str(refiner_bundle_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["refiner"]["crop"] == [8, 16, 16]


def test_touching_keeps_the_drawn_parts_that_overlap():
    drawn = np.zeros((1, 4, 8), bool)
    drawn[0, 1:3, 0:2] = drawn[0, 1:3, 4:6] = True  # two parts
    own = np.zeros_like(drawn)
    own[0, 2, 5] = own[0, 0, 7] = True  # overlaps the second part; one voxel outside both
    expected = np.zeros_like(drawn)
    expected[0, 1:3, 4:6] = True
    np.testing.assert_array_equal(touching(drawn, own), expected)
    assert not touching(drawn, np.zeros_like(drawn)).any()
