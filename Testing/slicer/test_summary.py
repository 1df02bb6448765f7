"""``UMLSegmentationLib.summary``: the case summary (schema 2) -> table rows, CSV rows, confidence panel."""

from __future__ import annotations

import csv
import math

import pytest

from UMLSegmentationLib.summary import (
    caseCsvRow,
    confidencePanel,
    csvColumns,
    flattenSummary,
    unflattenRows,
    writeCasesCsv,
)

SUMMARY = {
    "schema_version": 2,
    "case_id": "case01",
    "model": {"id": "m", "version": "1.0", "sha256": "ab" * 32, "path": "/models/m"},
    "geometry": {"size": [40, 32, 6], "spacing": [0.8, 0.75, 2.5], "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]},
    "device": "cpu",
    "timings_s": {"total": 1.25},
    "classification": {
        "classes": ["no pCR", "pCR"], "probabilities": [0.25, 0.75], "belief": [0.1, 0.6], "uncertainty": 0.3,
        "predicted_index": 1, "predicted_class": "pCR", "positive_class": "pCR", "positive_probability": 0.75,
        "verdict": "reliable", "fusion": "lesion-weighted evidence pooling", "calibration": "case_calibration",
        "reader": None,
    },
    "segments": [
        {"label": 1, "name": "Lesion", "color": [0.85, 0.2, 0.25], "voxel_count": 120, "volume_ml": 0.18, "mean_uncertainty": 0.21},
        {"label": 2, "name": "Satellite lesion", "color": [1, 1, 0], "voxel_count": 0, "volume_ml": 0.0, "mean_uncertainty": None},
    ],
    "slices": [{"index": 0, "probabilities": [0.5, 0.5], "lesion_voxels": 0}, {"index": 1, "probabilities": [0.2, 0.8], "lesion_voxels": 9}],
    "lesions": [],
    "outputs": {},
    "notes": [],
    "flag": True,
}


def test_flatten_puts_the_key_facts_first_and_round_trips():
    rows = flattenSummary(SUMMARY)
    assert rows[0] == ("case_id", "case01")
    assert rows[1][0].startswith("classification.")
    fields = dict(rows)
    assert fields["classification.probabilities"] == "[0.25, 0.75]"
    assert fields["classification.predicted_class"] == "pCR"
    assert fields["segments[1].mean_uncertainty"] == "null"
    assert fields["slices[1].probabilities"] == "[0.2, 0.8]"
    assert fields["model.version"] == '"1.0"'  # a string that would read back as a number is quoted
    assert fields["outputs"] == "{}" and fields["notes"] == "[]" and fields["flag"] == "true"
    assert len({f for f, _ in rows}) == len(rows)
    assert unflattenRows(rows) == SUMMARY


def test_confidence_panel():
    panel = confidencePanel(SUMMARY)
    assert (panel.predictedClass, panel.predictedProbability) == ("pCR", 0.75)
    assert (panel.positiveClass, panel.positiveProbability) == ("pCR", 0.75)
    assert panel.beliefs == (("no pCR", 0.1), ("pCR", 0.6))
    assert math.isclose(sum(b for _, b in panel.beliefs) + panel.uncertainty, 1.0)
    assert (panel.verdict, panel.verdictColor) == ("reliable", "#2e7d32")
    assert (panel.lesionName, panel.lesionVolumeMl, panel.lesionMeanUncertainty) == ("Lesion", 0.18, 0.21)
    assert panel.componentsRemoved is None  # no postprocessing section: the model has no filter
    assert not panel.singleVolume  # no inputs section
    one = [{"channel": c, "volume": 0} for c in ("pre", "early", "late")]
    assert confidencePanel({**SUMMARY, "inputs": one}).singleVolume
    assert not confidencePanel({**SUMMARY, "inputs": [{**c, "volume": i} for i, c in enumerate(one)]}).singleVolume
    assert not confidencePanel({**SUMMARY, "inputs": one[:1]}).singleVolume  # a one-channel model given its volume
    filtered = {**SUMMARY, "postprocessing": {"component_max_uncertainty": 0.06, "components_removed": 2}}
    assert confidencePanel(filtered).componentsRemoved == 2
    assert caseCsvRow(filtered, "c", "/in/c.nrrd", {})["components_removed"] == "2"
    unfiltered = {**SUMMARY, "postprocessing": {"component_max_uncertainty": None, "components_removed": 0}}
    assert confidencePanel(unfiltered).componentsRemoved is None
    assert caseCsvRow(unfiltered, "c", "/in/c.nrrd", {})["components_removed"] == ""  # no filter ran: empty, not 0
    verified = {**SUMMARY, "postprocessing": {"component_max_uncertainty": None, "segmentation_min_lesion": 0.6,
                                              "components_removed": 3}}
    assert caseCsvRow(verified, "c", "/in/c.nrrd", {})["components_removed"] == "3"  # the reader's check ran
    assert confidencePanel(verified).removedBy == "reader" and confidencePanel(filtered).removedBy == "uncertainty"
    aligned = {**SUMMARY, "motion_correction": {"mode": "translation", "reference": "early", "reason": None, "phases": [
        {"channel": "pre", "applied": True, "reason": None, "shift_mm": [3.0, 0.0, 4.0]},
        {"channel": "late", "applied": False, "reason": "registration failed (...)", "shift_mm": None}]}}
    assert caseCsvRow(aligned, "c", "/in/c.nrrd", {})["motion_shift_mm"] == "5.0"  # the longest shift applied
    assert caseCsvRow(SUMMARY, "c", "/in/c.nrrd", {})["motion_shift_mm"] == ""  # no motion correction
    review = confidencePanel({**SUMMARY, "classification": {**SUMMARY["classification"], "verdict": "review"}, "segments": []})
    assert review.verdictColor == "#e65100" and review.lesionVolumeMl is None and review.lesionMeanUncertainty is None
    with pytest.raises(ValueError, match="no classification"):
        confidencePanel({"case_id": "x"})


def test_confidence_panel_of_a_picture():
    """A picture (one slice): the lesion's size in pixels, a grey picture marked as such; a volume in ml."""
    volume = confidencePanel(SUMMARY)
    assert not volume.picture and volume.lesionSizeText == "0.18 ml (Lesion)" and volume.singleInputText == ""
    grey = [{"channel": c, "volume": 0} for c in ("red", "green", "blue")]
    picture = {**SUMMARY, "geometry": {**SUMMARY["geometry"], "size": [48, 40, 1]}, "slicing": {"axis": "axial", "count": 1},
               "inputs": grey}
    panel = confidencePanel(picture)
    assert panel.picture and panel.lesionVoxels == 120 and panel.lesionSizeText == "120 pixels (Lesion)"
    assert panel.singleVolume and panel.singleInputText == "from a grey picture"
    assert confidencePanel({**SUMMARY, "inputs": grey}).singleInputText == "from one volume"
    assert confidencePanel({**picture, "segments": []}).lesionSizeText == "-"


def test_csv_rows_and_columns(tmp_path):
    ok = caseCsvRow(SUMMARY, "case01", "/in/case01.nii.gz", {"segmentation": "/out/case01.seg.nrrd"})
    failed = caseCsvRow(None, "case02", "/in/case02.nii.gz", {}, "input is 2D: give a 3D volume")
    assert ok["probability_pcr"] == "0.75" and ok["belief_no_pcr"] == "0.1"
    assert ok["lesion_volume_ml"] == "0.18" and ok["satellite_lesion_mean_uncertainty"] == ""
    assert (failed["status"], failed["error"], failed["segmentation_file"]) == ("error", "input is 2D: give a 3D volume", "")
    columns = csvColumns([ok, failed])
    assert columns[:4] == ["case_id", "input", "status", "error"] and columns[-1] == "summary_file"
    path = writeCasesCsv([ok, failed], tmp_path / "r.csv")
    rows = list(csv.DictReader(open(path, newline="", encoding="utf-8")))
    assert [r["case_id"] for r in rows] == ["case01", "case02"]
    assert rows[1]["lesion_volume_ml"] == "" and rows[0]["verdict"] == "reliable"
    assert not (tmp_path / "r.csv.part").exists()


STACKING_RULE = "logistic stacking of the network and the reader outputs, the reader adding evidence"


def test_confidence_panel_says_what_the_lesion_reader_found():
    assert confidencePanel(SUMMARY).readerText == "" and confidencePanel(SUMMARY).readerToolTip == ""  # no reader
    assert confidencePanel({k: v for k, v in SUMMARY.items() if k != "lesions"}).readerText == ""
    reader = {"applied": True, "reason": None, "score": 0.62, "fusion": STACKING_RULE,
              "network_probabilities": [0.7, 0.3], "network_uncertainty": 0.39}
    lesions = [{"rank": 0, "suspicion": 0.2, "probabilities": {"lesion": 0.99, "spiculated": 0.1, "washout": 0.1}},
               {"rank": 1, "suspicion": 0.62, "probabilities": {"lesion": 0.9, "spiculated": 0.81, "washout": 0.12}}]
    read = {**SUMMARY, "classification": {**SUMMARY["classification"], "calibration": "reader.stacking", "reader": reader},
            "lesions": lesions}
    assert unflattenRows(flattenSummary(read)) == read  # the results table keeps the reader's findings
    panel = confidencePanel(read)
    assert panel.readerText == "62 % suspicious (spiculated 81 %, washout 12 %); most suspicious of 2 lesions read"
    tip = panel.readerToolTip
    assert tip.startswith("A second network read the 2 largest segmented lesions from patches of all phases")
    assert "A model fitted on evaluated cases combines its three outputs and its score with the network's opinion" in tip
    assert "may lower the uncertainty (the network alone: 39 %)" in tip
    assert "alone (uncalibrated) said 30 % pCR" in tip
    # the removed reader rules (a weight, averaging, log-odds pooling, the network's uncertainty kept) are not described
    assert "times" not in tip and "% of the case opinion" not in tip and "the uncertainty is the network's" not in tip
    one = confidencePanel({**read, "lesions": lesions[1:]})
    assert one.readerText.endswith("most suspicious of 1 lesion read") and "the 1 largest segmented lesion from" in one.readerToolTip
    no_u = {k: v for k, v in reader.items() if k != "network_uncertainty"}
    tip = confidencePanel({**read, "classification": {**read["classification"], "reader": no_u}}).readerToolTip
    assert "may lower the uncertainty." in tip and "the network alone:" not in tip
    for reason in ("nothing was segmented: the stacked rule reads the network's opinion alone",
                   "one volume was given: the reader needs every phase (kinetics); the network's opinion stands",
                   "the reader's rule is not fitted in this bundle (python -m training.fit opinion): the network's "
                   "opinion stands"):
        unused = {**reader, "applied": False, "score": None, "reason": reason}
        panel = confidencePanel({**SUMMARY, "classification": {**SUMMARY["classification"], "reader": unused}, "lesions": []})
        assert panel.readerText == f"not used: {reason}" and panel.readerToolTip == ""


def test_the_panel_and_the_table_read_the_shipped_models_summary(shipped_sample_prediction):
    """A real schema-2 summary of the shipped model (three phases: its reader reads the lesion) in the panel and the
    results table."""
    summary = shipped_sample_prediction.summary
    assert summary["schema_version"] == 2
    cls = summary["classification"]
    assert cls["reader"]["applied"] and cls["reader"]["fusion"] == STACKING_RULE and summary["lesions"]
    assert unflattenRows(flattenSummary(summary)) == summary
    panel = confidencePanel(summary)
    assert (panel.predictedClass, panel.verdict, panel.positiveProbability) == (cls["predicted_class"], cls["verdict"],
                                                                                cls["positive_probability"])
    assert math.isclose(sum(b for _, b in panel.beliefs) + panel.uncertainty, 1.0)
    n, top = len(summary["lesions"]), max(summary["lesions"], key=lambda lesion: lesion["suspicion"])["probabilities"]
    assert panel.readerText == (f"{100 * cls['reader']['score']:.0f} % suspicious (spiculated {100 * top['spiculated']:.0f} %, "
                                f"washout {100 * top['washout']:.0f} %); most suspicious of {n} lesion{'s' if n != 1 else ''} read")
    assert f"(the network alone: {100 * cls['reader']['network_uncertainty']:.0f} %)" in panel.readerToolTip
    assert panel.removedBy == "reader"  # the reader's check made the labelmap
    row = caseCsvRow(summary, "sample", "/in/sample", {})
    assert row["verdict"] == cls["verdict"] and row["lesion_volume_ml"] == repr(summary["segments"][0]["volume_ml"])


def test_the_panel_and_the_csv_carry_the_input_check():
    from UMLSegmentationLib.summary import caseCsvRow, confidencePanel

    reason = "the input looks like a CT scan in Hounsfield units (69 % ...), but this model was trained on MR scans"
    summary = {"classification": {"classes": ["a", "b"], "probabilities": [0.4, 0.6], "verdict": "review"},
               "input_check": {"status": "mismatch", "reasons": [reason], "notes": []}}
    assert confidencePanel(summary).inputWarning == reason
    assert caseCsvRow(summary, "c", "c.nii.gz", {})["input_check"] == reason
    older = {"classification": {"classes": ["a", "b"], "probabilities": [0.4, 0.6]}, "input_check": []}
    assert confidencePanel(older).inputWarning == ""
