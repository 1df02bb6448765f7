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
