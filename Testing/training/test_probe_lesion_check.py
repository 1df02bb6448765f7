"""training/probe_lesion_check.py: the Dice of component choices from per-component rows, and the study end to end."""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "training"))

import probe_lesion_check as plc  # noqa: E402

from umlcore import metrics  # noqa: E402
from umlcore.bundle import load_bundle, save_bundle  # noqa: E402
from umlcore.predictor import Predictor  # noqa: E402
from umlcore.reader import LesionReader, ReaderConfig  # noqa: E402
from umlcore.synthetic import generate_case  # noqa: E402


def _component(voxels, inside, u, p_lesion):
    return {"voxels": voxels, "inside": inside, "mean_uncertainty": u, "p": [p_lesion, 0.5, 0.5]}


CASES = [
    # a lesion of 100 voxels: a true component (80 inside), an uncertain true one (10 inside), a false one
    {"seed": 1, "truth_voxels": 100, "components": [_component(100, 80, 0.02, 0.9), _component(30, 0, 0.05, 0.3),
                                                    _component(10, 10, 0.2, 0.8)]},
    # lesion-free, one false component the reader rejects
    {"seed": 2, "truth_voxels": 0, "components": [_component(50, 0, 0.01, 0.6)]},
]


def test_dice_and_false_lesions_of_each_rule_by_hand():
    rows = {r["rule"]: r for r in plc.table(CASES, 0.08, (0.7,), 8)}
    assert rows["every component"]["dice_mean"] == pytest.approx(2 * 90 / (140 + 100))
    assert rows["every component"]["lesion_free_with_component"] == 1.0
    assert rows["mean uncertainty <= 0.08 (the card's filter)"]["dice_mean"] == pytest.approx(2 * 80 / (130 + 100))
    checked = rows["reader lesion >= 0.7, 8 largest"]
    assert checked["dice_mean"] == pytest.approx(2 * 90 / (110 + 100)) and checked["lesion_free_with_component"] == 0.0
    assert rows["the true components (oracle)"]["dice_mean"] == pytest.approx(2 * 90 / (110 + 100))
    # only the largest are read: with 1, the small true component goes
    assert plc.mean_dice(CASES, plc.rules(None, (0.7,), 1)["reader lesion >= 0.7, 1 largest"]) == \
        pytest.approx(2 * 80 / (100 + 100))
    sep = plc.separation(CASES)  # true: the 100- and 10-voxel ones; false: the 30- and 50-voxel ones
    assert (sep["true_components"], sep["false_components"]) == (2, 2)
    assert sep["auc_reader_lesion"] == 1.0 and sep["auc_minus_mean_uncertainty"] == 0.25


@pytest.fixture(scope="module")
def reader_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with an untrained reader, read in 8 views."""
    torch.manual_seed(0)
    card = dataclasses.replace(tiny_bundle.card, reader=ReaderConfig(test_time_augmentation="dihedral"))
    return save_bundle(tiny_bundle.model, card, tmp_path_factory.mktemp("lesion-check") / "bundle", reader=LesionReader(9))


def test_study_end_to_end_matches_the_predictor(reader_bundle, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert plc.main(["--model", str(reader_bundle), "--cases", "2", "--seed-from", "1000000", "--shape", "6", "32", "32",
                     "--thresholds", "0.5", "0.9", "--out", str(out)]) == 0
    assert "labelmap keeps" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [c["seed"] for c in report["cases"]] == [1_000_000, 1_000_001]
    assert [r["rule"] for r in report["table"]] == ["every component", "reader lesion >= 0.5, 8 largest",
                                                    "reader lesion >= 0.9, 8 largest", "the true components (oracle)"]
    # "every component" is the unfiltered labelmap of the predictor: the same Dice, the same components
    bundle = load_bundle(reader_bundle)
    bare = dataclasses.replace(bundle, card=dataclasses.replace(bundle.card, reader=None))
    dices = []
    for row in report["cases"]:
        case = generate_case(row["seed"], shape=(6, 32, 32), label_noise=0.02)
        labels = sitk.GetArrayFromImage(Predictor(bare, device="cpu").predict(case.to_sitk()).labelmap)
        assert sum(k["voxels"] for k in row["components"]) == int((labels > 0).sum())
        assert row["truth_voxels"] == int(case.mask.sum())
        assert all(0 <= v <= 1 for k in row["components"] for v in k["p"])
        if case.mask.any():
            dices.append(metrics.dice(labels, case.mask))
    assert report["table"][0]["dice_mean"] == (pytest.approx(float(np.mean(dices))) if dices else None)
    assert report["table"][0]["lesion_free_with_component"] is None  # both cases have a lesion: null, not NaN


def test_a_bundle_without_a_reader_is_refused(tiny_bundle_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        plc.main(["--model", str(tiny_bundle_dir), "--cases", "1"])
    assert exc.value.code == 2 and "has no lesion reader" in capsys.readouterr().err


def test_opinion_what_if_reads_the_most_suspicious_of_the_chosen_components(tiny_bundle):
    from umlcore.fusion import stack_reader_opinion

    coefficients = {"intercept": -0.5, "network": 0.2, "suspicion": 1.0, "lesion": 0.1, "spiculated": -0.3,
                    "washout": 0.4}
    reader = ReaderConfig(fusion="stacked", weight=1.0, stacking=coefficients)
    card = dataclasses.replace(tiny_bundle.card, reader=reader, component_max_uncertainty=0.08)
    rows = {1: {"network_positive_probability": 0.3, "network_uncertainty": 0.2, "label": 1},
            2: {"network_positive_probability": 0.6, "network_uncertainty": 0.5, "label": 0}}

    def expected(p, u, top):
        a = stack_reader_opinion(np.array([2 / u * (1 - p), 2 / u * p]), top, coefficients)
        return a[1] / a.sum()

    # the card's reading: case 1 reads its two certain components, the first the more suspicious (p 0.9 vs 0.3);
    # case 2 its one component
    card_reading = plc.opinions(CASES, rows, card, lambda i, k: k["mean_uncertainty"] <= 0.08)
    np.testing.assert_allclose(card_reading, [expected(0.3, 0.2, np.array([0.9, 0.5, 0.5])),
                                              expected(0.6, 0.5, np.array([0.6, 0.5, 0.5]))])
    # the checked labelmap at 0.7: case 2 keeps nothing, so the stacked rule reads the network alone
    checked = plc.opinions(CASES, rows, card, lambda i, k: k["p"][0] >= 0.7)
    assert checked[1] == pytest.approx(expected(0.6, 0.5, None))
    table = plc.opinion_table(CASES, rows, card, (0.7,), 8)
    assert [r["opinion_reads"] for r in table] == ["the card's (after its uncertainty filter)",
                                                   "the checked labelmap, reader lesion >= 0.7"]
    assert table[0]["auc"] == (1.0 if card_reading[0] > card_reading[1] else 0.0)


def test_fit_report_from_saved_rows_is_what_fit_reader_fusion_pools(tiny_bundle, tmp_path, capsys):
    import fit_reader_fusion

    coefficients = {"intercept": -0.5, "network": 0.2, "suspicion": 1.0, "lesion": 0.1, "spiculated": -0.3,
                    "washout": 0.4}
    reader = ReaderConfig(fusion="stacked", weight=1.0, stacking=coefficients, segmentation_min_lesion=0.7,
                          opinion_reads="checked")
    card = dataclasses.replace(tiny_bundle.card, reader=reader, case_calibration={"slope": 1.0, "intercept": 0.0})
    bundle = save_bundle(tiny_bundle.model, card, tmp_path / "checked", reader=LesionReader(9))
    sha = load_bundle(bundle).sha256
    (tmp_path / "rows.json").write_text(json.dumps({"cases": CASES}))
    report = {"model": {"sha256": sha}, "dataset": "2 synthetic cases, shape (6, 32, 32)",
              "summary": {"component_max_uncertainty": None},
              "validation_cases": [{"seed": 1, "label": 1, "clean_label": 1, "network_positive_probability": 0.3,
                                    "network_uncertainty": 0.2, "reader_score": 0.1}],
              "cases": [{"seed": 2, "label": 0, "clean_label": 0, "network_positive_probability": 0.6,
                         "network_uncertainty": 0.5, "reader_score": 0.2}]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    fit = tmp_path / "fit.json"
    assert plc.main(["--model", str(bundle), "--from-rows", str(tmp_path / "rows.json"), "--report",
                     str(tmp_path / "report.json"), "--thresholds", "0.7", "--fit-report", str(fit)]) == 0
    assert "2 case rows of the opinion reading the labelmap checked at 0.7" in capsys.readouterr().out
    written = json.loads(fit.read_text())
    (v,), (t,) = written["validation_cases"], written["cases"]
    assert v["seed"] == 1 and v["reader_probabilities"] == [0.9, 0.5, 0.5]  # the most suspicious kept component
    assert v["reader_score"] == pytest.approx(0.9 * 0.75) and v["network_positive_probability"] == 0.3
    assert t["seed"] == 2 and t["reader_probabilities"] is None and t["reader_score"] is None  # 0.6 < 0.7: none kept
    rows, groups = fit_reader_fusion.pooled_rows([fit], load_bundle(bundle), pytest.fail)
    assert [r["seed"] for r in rows] == [1, 2] and set(groups) == {"validation", f"{fit}: test cases"}
    with pytest.raises(SystemExit):  # rows measured with other weights
        (tmp_path / "other.json").write_text(json.dumps({"sha256": "0" * 64, "cases": CASES}))
        plc.main(["--model", str(bundle), "--from-rows", str(tmp_path / "other.json")])
    assert "measured with other weights" in capsys.readouterr().err
