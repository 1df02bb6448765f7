"""training.evaluate: a bundle end to end on synthetic cases; figures per input and noise level, rows per case."""

import json

import numpy as np
import pytest

from training import evaluate
from training.config import run_tool
from training.evaluate import card_settings, ece_sampling_floor, json_safe, section_figures


@pytest.fixture(scope="module")
def report(tiny_bundle_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert evaluate.main(["--model", str(tiny_bundle_dir), "--out", str(out), "--split", "validation",
                          "--first-seed", "1000010", "--cases", "3", "--inputs", "phases", "early",
                          "--noise", "0", "0.1", "--shape", "6", "48", "48", "--device", "cpu"]) == 0
    return out


def test_the_report_has_figures_per_input_and_noise_and_a_row_per_case(report, tiny_bundle):
    r = json.loads((report / "report.json").read_text())
    assert r["model"]["sha256"] == tiny_bundle.sha256 and r["model"]["settings"] == card_settings(tiny_bundle.card)
    assert r["split"] == "validation" and r["seeds"] == [1_000_010, 1_000_012]
    assert r["command"].startswith("python -m training.evaluate --model")
    assert list(r["figures"]) == ["phases", "phases, noise 0.1", "early", "early, noise 0.1"]
    assert len(r["rows"]) == 12 and {(x["input"], x["noise"]) for x in r["rows"]} == {
        ("phases", 0.0), ("phases", 0.1), ("early", 0.0), ("early", 0.1)}
    f = r["figures"]["phases"]
    for key in ("dice_mean", "auc", "ece", "nll", "brier", "pixel_uncertainty_error_auroc", "lesion_free_segmented",
                "suggested_review_uncertainty", "dice_by_lesion_size", "errors_by_phenotype"):
        assert key in f, key
    row = r["rows"][0]
    assert row["seed"] == 1_000_010 and row["calibration"] is None and row["reader_score"] is None
    assert 0 <= row["positive_probability"] <= 1 and row["network_positive_probability"] == row["positive_probability"]
    for c in row["components"]:  # the network's own components, largest first, for the threshold fits
        assert set(c) == {"voxels", "inside", "mean_uncertainty", "p_lesion"} and c["p_lesion"] is None
    sizes = [c["voxels"] for c in row["components"]]
    assert sizes == sorted(sizes, reverse=True)
    assert (report / "report.md").read_text().startswith("# Evaluation of `test-model` 0.0.1")
    assert (report / "reliability.png").stat().st_size > 0


def test_the_rows_are_the_predictors_own_opinions(report, tiny_bundle):
    from training.cases import input_volumes
    from umlcore.predictor import Predictor
    from umlcore.synthetic import generate_case

    r = json.loads((report / "report.json").read_text())
    row = next(x for x in r["rows"] if x["input"] == "early" and x["noise"] == 0 and x["seed"] == 1_000_011)
    case = generate_case(1_000_011, shape=(6, 48, 48), label_noise=0.02)
    c = Predictor(tiny_bundle, device="cpu").predict(input_volumes(case, "early")).summary["classification"]
    assert row["positive_probability"] == pytest.approx(c["positive_probability"], rel=1e-9)
    assert row["label"] == case.label and row["lesion_voxels"] == int(case.mask.sum())


def test_bad_settings_are_refused_with_one_line(tiny_bundle_dir, tmp_path, capsys):
    model = ["--model", str(tiny_bundle_dir)]
    for argv, phrase in ((["--cases", "1"], "--model is required"),
                         ([*model, "--inputs", "t2"], "--inputs ['t2']"),
                         ([*model, "--split", "train"], "invalid choice: 'train'"),
                         ([*model, "--first-seed", "5"], "leave the test split"),
                         ([*model, "--cases", "0"], "must be at least 1"),
                         ([*model, "--shape", "8", "4", "4"], "--shape must be 3 sizes"),
                         ([*model, "--device", "tpu"], "invalid choice: 'tpu'"),
                         (["--model", str(tmp_path / "none")], "does not exist")):
        assert run_tool(evaluate.main, "python -m training.evaluate", [*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m training.evaluate: error: ") and phrase in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_figures_of_known_rows():
    def row(lesion_voxels, dice, predicted, p, label, lesions=1, margin="smooth", kinetics="plateau", score=None):
        return {"lesion_voxels": lesion_voxels, "dice": dice, "hd95_mm": 1.0 if dice is not None else None,
                "predicted_voxels": predicted, "positive_probability": p, "uncertainty": 0.2, "label": label,
                "clean_label": label, "lesions": lesions, "margin": margin, "kinetics": kinetics, "reader_score": score,
                "network_positive_probability": p}

    rows = [row(0, None, 5, 0.2, 0, lesions=0), row(40, 0.0, 0, 0.3, 0), row(60, 0.5, 10, 0.6, 1, margin="spiculated"),
            row(400, 0.8, 300, 0.9, 1, kinetics="washout", score=0.95), row(5000, 0.9, 4800, 0.1, 0)]
    f = section_figures(rows)
    assert f["cases"] == 5 and f["cases_with_lesion"] == 4 and f["lesion_free_segmented"] == 1.0
    assert f["dice_by_lesion_size"] == {"1-99": {"cases": 2, "dice_mean": 0.25, "nothing_predicted": 1},
                                        "100-999": {"cases": 1, "dice_mean": 0.8, "nothing_predicted": 0},
                                        ">=1000": {"cases": 1, "dice_mean": 0.9, "nothing_predicted": 0}}
    assert f["auc"] == 1.0 and f["accuracy"] == 1.0
    groups = f["errors_by_phenotype"]
    assert [groups[g]["cases"] for g in groups] == [1, 2, 1, 1] and groups["washout"]["reader_score_median"] == 0.95
    assert f["reader"]["cases_read"] == 1


def test_ece_sampling_floor_is_the_noise_of_a_calibrated_model():
    # p = 0.5 everywhere: the ECE is |fraction of positives - 0.5|, whose median over Binomial(100, 0.5) draws is 0.03
    assert ece_sampling_floor(np.full(100, 0.5)) == pytest.approx(0.03, abs=0.011)
    assert ece_sampling_floor(np.full(10000, 0.5), draws=50) < 0.005  # many cases: the floor vanishes
    assert ece_sampling_floor(np.array([0.0, 1.0] * 50)) == 0.0  # certain and right: no noise


def test_json_safe_turns_undefined_metrics_into_null():
    assert json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2, "e": "x"}}) == \
        {"a": None, "b": [1.0, None], "c": {"d": 2, "e": "x"}}
