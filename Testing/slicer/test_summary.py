"""Case summary -> table rows, CSV rows, confidence panel."""

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
    "schema_version": 1,
    "case_id": "case01",
    "model": {"id": "m", "version": "1.0", "sha256": "ab" * 32, "path": "/models/m"},
    "geometry": {"size": [40, 32, 6], "spacing": [0.8, 0.75, 2.5], "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]},
    "device": "cpu",
    "timings_s": {"total": 1.25},
    "classification": {
        "classes": ["no pCR", "pCR"], "probabilities": [0.25, 0.75], "belief": [0.1, 0.6], "uncertainty": 0.3,
        "predicted_index": 1, "predicted_class": "pCR", "positive_class": "pCR", "positive_probability": 0.75,
        "verdict": "reliable", "fusion": "lesion-weighted evidence pooling",
    },
    "segments": [
        {"label": 1, "name": "Lesion", "color": [0.85, 0.2, 0.25], "voxel_count": 120, "volume_ml": 0.18, "mean_uncertainty": 0.21},
        {"label": 2, "name": "Satellite lesion", "color": [1, 1, 0], "voxel_count": 0, "volume_ml": 0.0, "mean_uncertainty": None},
    ],
    "slices": [{"index": 0, "probabilities": [0.5, 0.5], "lesion_voxels": 0}, {"index": 1, "probabilities": [0.2, 0.8], "lesion_voxels": 9}],
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


def test_confidence_panel_says_what_the_lesion_reader_found():
    assert confidencePanel(SUMMARY).readerText == ""  # a model without a reader
    reader = {"applied": True, "reason": None, "score": 0.62, "weight": 0.5, "fusion": "averaging fusion at equal uncertainty",
              "network_probabilities": [0.7, 0.3]}
    lesions = [{"rank": 0, "suspicion": 0.2, "probabilities": {"lesion": 0.99, "spiculated": 0.1, "washout": 0.1}},
               {"rank": 1, "suspicion": 0.62, "probabilities": {"lesion": 0.9, "spiculated": 0.81, "washout": 0.12}}]
    read = {**SUMMARY, "classification": {**SUMMARY["classification"], "reader": reader}, "lesions": lesions}
    assert unflattenRows(flattenSummary(read)) == read  # the results table keeps the reader's findings
    panel = confidencePanel(read)
    assert panel.readerText == "62 % suspicious (spiculated 81 %, washout 12 %); most suspicious of 2 lesions read"
    assert "50 % of the case opinion" in panel.readerToolTip and "alone (uncalibrated) said 30 % pCR" in panel.readerToolTip
    logit = {**reader, "weight": 0.6, "fusion": "log-odds pooling at equal uncertainty"}
    tip = confidencePanel({**read, "classification": {**read["classification"], "reader": logit}}).readerToolTip
    assert "log-odds are added to the case's, times 0.60" in tip and "% of the case opinion" not in tip
    assert "the uncertainty is the network's" in tip
    evidence = {**reader, "weight": 0.7, "fusion": "log-odds pooling, the reader adding evidence",
                "network_uncertainty": 0.39}
    tip = confidencePanel({**read, "classification": {**read["classification"], "reader": evidence}}).readerToolTip
    assert "times 0.70" in tip and "may lower the uncertainty (the network alone: 39 %)" in tip
    assert "the uncertainty is the network's" not in tip
    stacked = {**reader, "weight": 1.0, "network_uncertainty": 0.39,
               "fusion": "logistic stacking of the network and the reader outputs, the reader adding evidence"}
    tip = confidencePanel({**read, "classification": {**read["classification"], "reader": stacked}}).readerToolTip
    assert "A model fitted on evaluated cases combines its three outputs" in tip and "times" not in tip
    assert "% of the case opinion" not in tip and "may lower the uncertainty (the network alone: 39 %)" in tip
    assert "not in the segmentation" not in tip
    checked = [{**lesions[0], "in_labelmap": False}, {**lesions[1], "in_labelmap": True}]
    tip = confidencePanel({**read, "lesions": checked}).readerToolTip
    assert "1 of the lesions read is not in the segmentation: the reader judged it not to be a lesion." in tip
    unused = {**reader, "applied": False, "score": None, "reason": "nothing was segmented"}
    panel = confidencePanel({**SUMMARY, "classification": {**SUMMARY["classification"], "reader": unused}, "lesions": []})
    assert panel.readerText == "not used: nothing was segmented" and panel.readerToolTip == ""
