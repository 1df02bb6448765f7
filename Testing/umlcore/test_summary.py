"""umlcore.summary: the case summary's documented fields, through the predictor (docs/summary-schema.md)."""

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from umlcore.fusion import fuse_slice_opinions
from umlcore.predictor import Predictor

SUMMARY_KEYS = {
    "schema_version", "case_id", "inputs", "input_check", "model", "geometry", "slicing", "device", "precision", "threads", "timings_s",
    "motion_correction", "classification", "segments", "slices", "outputs", "postprocessing", "lesions",
}
CLASSIFICATION_KEYS = {
    "classes", "probabilities", "belief", "uncertainty", "predicted_index", "predicted_class", "positive_class",
    "positive_probability", "verdict", "fusion", "calibration", "reader",
}


@pytest.fixture(scope="module")
def base_prediction(tiny_bundle, make_volume):
    return Predictor(tiny_bundle, device="cpu", batch_size=4).predict(make_volume())


def test_summary_has_the_documented_fields(base_prediction, tiny_bundle, make_volume):
    s = base_prediction.summary
    assert set(s) == SUMMARY_KEYS
    assert s["schema_version"] == 2 and s["case_id"] == "case" and s["device"] == "cpu" and s["outputs"] == {}
    assert s["model"] == {"id": "test-model", "version": "0.0.1", "sha256": tiny_bundle.sha256,
                          "card_sha256": tiny_bundle.card_sha256, "path": str(tiny_bundle.path)}
    assert len(tiny_bundle.card_sha256) == 64
    assert s["geometry"] == {"size": [32, 32, 6], "spacing": [0.7, 0.9, 2.5], "origin": [-12.5, 30.25, 7.0],
                             "direction": list(make_volume().GetDirection())}
    assert s["inputs"] == [{"channel": c, "volume": 0} for c in ("pre", "early", "late")]
    assert s["slicing"] == {"axis": "axial", "index_axis": 2, "count": 6, "context_slices": 0}
    assert set(s["timings_s"]) == {"read", "preprocess", "inference", "postprocess", "total"}
    assert s["postprocessing"] == {"component_max_uncertainty": None, "segmentation_min_lesion": None,
                                   "components_removed": 0}
    assert all(v >= 0 for v in s["timings_s"].values())
    c = s["classification"]
    assert set(c) == CLASSIFICATION_KEYS
    assert c["reader"] is None and s["lesions"] == []  # a card without a lesion reader (tests: test_reader.py)
    assert c["classes"] == ["no pCR", "pCR"] and c["positive_class"] == "pCR" and c["fusion"] == "lesion-weighted evidence pooling"
    assert sum(c["probabilities"]) == pytest.approx(1) and sum(c["belief"]) + c["uncertainty"] == pytest.approx(1)
    assert c["predicted_class"] == c["classes"][c["predicted_index"]] == c["classes"][int(np.argmax(c["probabilities"]))]
    assert c["positive_probability"] == c["probabilities"][1]
    assert c["verdict"] == ("review" if c["uncertainty"] > tiny_bundle.card.review_uncertainty else "reliable")
    labels = sitk.GetArrayFromImage(base_prediction.labelmap)
    (seg,) = s["segments"]
    assert set(seg) == {"label", "name", "color", "voxel_count", "volume_ml", "mean_uncertainty"}
    assert seg["voxel_count"] == int((labels == 1).sum())
    assert seg["volume_ml"] == pytest.approx(seg["voxel_count"] * 0.7 * 0.9 * 2.5 / 1000)
    assert len(s["slices"]) == 6 and set(s["slices"][0]) == {"index", "lesion_voxels", "probabilities", "uncertainty"}
    assert [sl["lesion_voxels"] for sl in s["slices"]] == [int((labels[k] > 0).sum()) for k in range(6)]
    # the case opinion is the lesion-weighted pooling of the slice opinions (alpha_s = K p_s / u_s)
    slice_alpha = np.array([np.array(sl["probabilities"]) * 2 / sl["uncertainty"] for sl in s["slices"]])
    fused = fuse_slice_opinions(slice_alpha, np.array([sl["lesion_voxels"] for sl in s["slices"]]))
    np.testing.assert_allclose(c["probabilities"], fused / fused.sum(), rtol=1e-9)
    assert c["uncertainty"] == pytest.approx(2 / fused.sum())


def test_segments_with_voxels_report_mean_uncertainty(tiny_bundle, make_volume):
    # force every voxel to the lesion label by a bundle whose model always votes label 1
    class Lesion(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x)
            seg = out.seg_alpha.clone()
            seg[:, 1] = seg[:, 0] + 1.0
            return out._replace(seg_alpha=seg)

    bundle = dataclasses.replace(tiny_bundle, model=Lesion(tiny_bundle.model))
    pred = Predictor(bundle, device="cpu").predict(make_volume())
    (seg,) = pred.summary["segments"]
    assert seg["voxel_count"] == 32 * 32 * 6
    assert seg["mean_uncertainty"] == pytest.approx(float(sitk.GetArrayFromImage(pred.uncertainty).mean()), rel=1e-5)
    assert all(sl["lesion_voxels"] == 32 * 32 for sl in pred.summary["slices"])
