"""The PNG preview: the key slice is the one with most lesion, and `uml predict --preview` writes it."""

import json

import numpy as np
import SimpleITK as sitk

from umlcore.cli import main
from umlcore.preview import key_slice


def test_key_slice_prefers_lesion_then_uncertainty():
    lab = np.zeros((4, 5, 5), np.uint8)
    lab[2, :3, :3] = 1
    lab[1, 0, 0] = 1
    unc = np.zeros((4, 5, 5), np.float32)
    unc[3] = 1.0
    assert key_slice(lab, unc) == 2
    assert key_slice(np.zeros_like(lab), unc) == 3


def test_predict_with_preview_writes_a_png(tmp_path, tiny_bundle_dir):
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.random((5, 24, 24)).astype(np.float32))
    img.SetSpacing((0.8, 0.8, 2.0))
    src = tmp_path / "case1.nrrd"
    sitk.WriteImage(img, str(src))
    code = main(["predict", str(src), "-o", str(tmp_path / "out"), "--model", str(tiny_bundle_dir), "--preview",
                 "--progress", "none"])
    assert code == 0
    png = tmp_path / "out" / "case1" / "preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "out" / "case1" / "summary.json").read_text())
    assert summary["outputs"]["preview"] == "preview.png"


def test_a_picture_preview_shows_the_picture_in_colour_with_each_segment_outlined(tmp_path):
    from PIL import Image

    from umlcore.preview import write_preview

    h, w = 30, 40
    red = np.zeros((1, h, w), np.uint8) + 200  # a red picture: the preview's left panel is red, not grey
    volumes = [sitk.GetImageFromArray(a) for a in (red, red // 8, red // 8)]
    labels = np.zeros((1, h, w), np.uint8)
    labels[0, 5:25, 5:30], labels[0, 10:20, 10:20] = 1, 2  # disc and cup
    summary = {"case_id": "fundus", "model": {}, "segments": [
        {"label": 1, "name": "Optic disc", "color": [0.0, 1.0, 0.0], "voxel_count": 300, "volume_ml": 0.3,
         "mean_uncertainty": 0.2},
        {"label": 2, "name": "Optic cup", "color": [0.0, 0.0, 1.0], "voxel_count": 100, "volume_ml": 0.1,
         "mean_uncertainty": 0.3}],
        "classification": {"classes": ["healthy", "glaucoma"], "belief": [0.6, 0.2], "uncertainty": 0.2,
                           "probabilities": [0.7, 0.3], "predicted_class": "healthy", "verdict": "reliable"}}
    path = write_preview(volumes, sitk.GetImageFromArray(labels), sitk.GetImageFromArray(np.full((1, h, w), 0.3, np.float32)),
                         summary, tmp_path / "preview.png", picture=True)
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    assert ((pixels[:, 0] > 150) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)).sum() > 1000  # the red picture
    assert ((pixels[:, 1] > 150) & (pixels[:, 0] < 100) & (pixels[:, 2] < 100)).any()  # the disc's green outline
