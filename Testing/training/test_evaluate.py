"""training.evaluate: a bundle end to end on synthetic cases (figures per input and noise level) and on a dataset's
split (figures per noise section, per segment), rows per case."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

from training import evaluate
from training.cases import add_noise
from training.config import run_tool
from training.datasets import Case, ISPY1Dataset, REFUGEDataset, write_split
from training.evaluate import card_settings, ece_sampling_floor, json_safe, section_figures
from training.evaluate_dataset import CLEAN, case_images, classification_figures, sections, segmentation_figures
from training.noise import apply_noise, gaussian_noise, noise_rng, salt_and_pepper
from umlcore.bundle import load_bundle
from umlcore.card import InputSpec, Segment
from umlcore.predictor import Predictor

from .layouts import write_folder_volumes, write_ispy1, write_refuge


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


# --------------------------------------------------------------------------------------------- a dataset's split

TUMOUR = Segment(1, "Tumour", (0.9, 0.35, 0.1))


def _split(dataset, out):
    path = write_split(dataset.split((0.5, 0.25, 0.25), 0), out / "split.json")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ispy(tmp_path_factory, bundle_factory):
    """An I-SPY1 layout, its split, a one-channel volume bundle whose card records that split, and its report."""
    root = tmp_path_factory.mktemp("ispy")
    write_ispy1(root / "data", n=8, shape=(6, 32, 32))
    split, sha = _split(ISPY1Dataset(root / "data"), root)
    bundle = bundle_factory(config_overrides={"in_channels": 1}, input=InputSpec(channels=("DCEMRI_1",)),
                            segments=(TUMOUR,), training={"split_sha256": sha})
    out = root / "eval"
    assert evaluate.main(["--model", str(bundle), "--data", f"ispy1:{root / 'data'}", "--split", "test",
                          "--split-file", str(split), "--noise", "0.1", "--salt-pepper", "0.05", "--device", "cpu",
                          "--out", str(out)]) == 0
    return {"root": root, "split": split, "sha": sha, "bundle": bundle, "out": out}


def test_a_dataset_report_has_the_papers_figures_per_section_and_a_row_per_case(ispy):
    r = json.loads((ispy["out"] / "report.json").read_text())
    test_cases = json.loads(ispy["split"].read_text())["test"]
    assert r["split"] == "test" and r["cases"] == test_cases and r["data"]["spec"].startswith("ispy1:")
    assert r["split_file"] == {"path": str(ispy["split"]), "sha256": ispy["sha"], "card_split_sha256": ispy["sha"],
                               "matches_card": True}
    assert r["model"]["sha256"] == load_bundle(ispy["bundle"]).sha256
    assert list(r["figures"]) == [CLEAN, "gaussian 0.1", "salt-and-pepper 0.05"]
    assert [s["noise"] for s in r["sections"]] == ["none", "gaussian", "salt_and_pepper"]
    for f in r["figures"].values():
        for key in ("auc", "accuracy", "kappa", "sensitivity", "specificity", "f1", "f1_weighted", "ece", "nll",
                    "brier", "eaurc", "aurc", "case_uncertainty_mean", "pixel_uncertainty_error_auroc", "dice_mean"):
            assert key in f, key
        assert f["cases"] == len(test_cases) and list(f["segments"]) == ["Tumour"]
        seg = f["segments"]["Tumour"]
        assert {"dice_mean", "dice_median", "assd_mm_mean", "assd_mm_median", "hd95_mm_mean", "hd95_mm_median",
                "missed_cases", "predicted_where_absent", "cases_with_segment"} <= set(seg)
    assert len(r["rows"]) == 3 * len(test_cases)
    assert {(x["case_id"], x["section"]) for x in r["rows"]} == {(c, s) for c in test_cases for s in r["figures"]}
    assert "--split-file" in r["command"] and r["config"]["salt_pepper"] == [0.05] and "shape" not in r["config"]
    md = (ispy["out"] / "report.md").read_text()
    assert md.startswith("# Evaluation of `test-model` 0.0.1") and "| Tumour |" in md and "salt-and-pepper 0.05" in md
    assert "the split the model was trained with" in md
    assert (ispy["out"] / "reliability.png").stat().st_size > 0


def test_a_dataset_row_is_the_predictors_own_answer_on_the_cases_file_geometry(ispy):
    from umlcore import metrics

    r = json.loads((ispy["out"] / "report.json").read_text())
    data = ISPY1Dataset(ispy["root"] / "data")
    case = data.load(r["cases"][0])
    pred = Predictor(load_bundle(ispy["bundle"]), device="cpu").predict(case_images(case))
    row = next(x for x in r["rows"] if x["case_id"] == case.case_id and x["section"] == CLEAN)
    c = pred.summary["classification"]
    assert row["positive_probability"] == pytest.approx(c["positive_probability"], rel=1e-9)
    labels = sitk.GetArrayFromImage(pred.labelmap)
    seg = row["segments"]["Tumour"]
    assert seg["true_voxels"] == int((case.mask == 1).sum()) and seg["predicted_voxels"] == int((labels == 1).sum())
    if seg["true_voxels"]:
        assert seg["dice"] == pytest.approx(metrics.dice(labels, case.mask))
    assert row["label"] == case.label
    noisy = next(x for x in r["rows"] if x["case_id"] == case.case_id and x["section"] == "gaussian 0.1")
    assert noisy["noise_kind"] == "gaussian" and noisy["noise"] == 0.1


def test_a_picture_dataset_is_read_as_umlcore_reads_a_png(tmp_path, bundle_factory):
    if "kind" not in {f.name for f in dataclasses.fields(InputSpec)}:
        pytest.skip("umlcore has no picture models yet (InputSpec.kind)")
    write_refuge(tmp_path / "refuge", n=6, size=48)
    split, sha = _split(REFUGEDataset(tmp_path / "refuge"), tmp_path)
    segments = (Segment(1, "Optic disc rim", (0.95, 0.8, 0.2)), Segment(2, "Optic cup", (0.2, 0.55, 0.95)))
    bundle = bundle_factory(config_overrides={"num_seg_labels": 3},
                            input=InputSpec(kind="picture", channels=("red", "green", "blue")), segments=segments)
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(bundle), "--data", f"refuge:{tmp_path / 'refuge'}", "--split-file", str(split),
                          "--salt-pepper", "0.1", "--cases", "1", "--device", "cpu", "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert list(r["figures"]) == [CLEAN, "salt-and-pepper 0.1"] and len(r["cases"]) == 1 and len(r["rows"]) == 2
    assert list(r["figures"][CLEAN]["segments"]) == ["Optic disc rim", "Optic cup"]
    assert r["split_file"]["sha256"] == sha and r["split_file"]["matches_card"] is None  # the card records no split
    assert "records no split" in (out / "report.md").read_text()
    images = case_images(REFUGEDataset(tmp_path / "refuge").load(r["cases"][0]))
    assert len(images) == 3 and images[0].GetSize() == (48, 48, 1) and images[0].GetSpacing() == (1.0, 1.0, 1.0)
    assert images[0].GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_case_images_keep_a_volumes_geometry():
    case = Case("c", [np.arange(24, dtype=np.float32).reshape(2, 3, 4)], np.zeros((2, 3, 4), np.uint8), 0,
                (0.5, 0.7, 2.0), {"origin": (1.0, 2.0, 3.0), "direction": (0, 1, 0, 1, 0, 0, 0, 0, -1)})
    (image,) = case_images(case)
    assert image.GetSize() == (4, 3, 2) and image.GetSpacing() == (0.5, 0.7, 2.0)
    assert image.GetOrigin() == (1.0, 2.0, 3.0) and image.GetDirection() == (0, 1, 0, 1, 0, 0, 0, 0, -1)
    assert np.array_equal(sitk.GetArrayFromImage(image), case.images[0])
    bare = dataclasses.replace(case, meta={"origin": None, "direction": None})  # what nibabel's fallback gives
    assert case_images(bare)[0].GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)


def test_a_dataset_evaluation_refuses_what_a_user_can_fix_with_one_line(tmp_path, tiny_bundle_dir, capsys):
    root = write_folder_volumes(tmp_path / "folder", n=4, shape=(6, 32, 32))
    ispy_split = write_split({"train": ["ISPY_1001"], "val": [], "test": ["ISPY_1002"]}, tmp_path / "other.json")
    empty = write_split({"train": ["case00", "case01"], "val": ["case02"], "test": []}, tmp_path / "notest.json")
    model = ["--model", str(tiny_bundle_dir)]
    data = [*model, "--data", f"folder:{root}"]
    for argv, phrase in (([*model, "--data", "nosuch:/x"], "--data must be 'synthetic' or KIND:PATH"),
                         ([*model, "--data", "folder"], "--data must be"),
                         (data, "--split-file is required"),
                         ([*data, "--split-file", str(tmp_path / "none.json")], "not found"),
                         ([*data, "--split-file", str(ispy_split)], "does not hold (e.g. 'ISPY_1001')"),
                         ([*data, "--split-file", str(empty)], "the test part of"),
                         ([*data, "--split-file", str(empty), "--shape", "6", "32", "32"], "--shape"),
                         ([*data, "--split-file", str(empty), "--salt-pepper", "1.5"], "--salt-pepper must be"),
                         ([*model, "--salt-pepper", "0.1"], "settings of a dataset"),
                         ([*model, "--split-file", str(empty)], "settings of a dataset"),
                         ([*model, "--data", f"folder:{tmp_path / 'none'}", "--split-file", str(empty)],
                          "does not exist")):
        assert run_tool(evaluate.main, "python -m training.evaluate", [*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m training.evaluate: error: ") and phrase in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_three_class_model_gets_its_figures_and_a_case_it_cannot_segment_is_refused(tmp_path, bundle_factory, capsys):
    root = write_folder_volumes(tmp_path / "folder", n=4, shape=(6, 32, 32))
    split = write_split({"train": ["case00", "case01"], "val": ["case02"], "test": ["case03"]}, tmp_path / "s.json")
    bundle = bundle_factory(config_overrides={"num_classes": 3})
    assert run_tool(evaluate.main, "python -m training.evaluate",
                    ["--model", str(bundle), "--data", f"folder:{root}", "--split", "validation", "--split-file",
                     str(split), "--device", "cpu", "--out", str(tmp_path / "ok")]) == 0
    r = json.loads((tmp_path / "ok" / "report.json").read_text())
    f = r["figures"][CLEAN]
    assert r["split"] == "val" and r["cases"] == ["case02"] and r["split_file"]["matches_card"] is None
    assert {"accuracy", "kappa", "f1_macro", "f1_weighted", "ece", "nll", "brier"} <= set(f) and "auc" not in f
    assert "has 3" in f["not_reported"]
    assert "AUC, sensitivity" in (tmp_path / "ok" / "report.md").read_text()
    # a mask label the model does not predict: refused, nothing written
    mask = sitk.ReadImage(str(root / "masks" / "case03.nii.gz"))
    sitk.WriteImage(sitk.Cast(mask, sitk.sitkUInt8) * 0 + 2, str(root / "masks" / "case03.nii.gz"))
    assert run_tool(evaluate.main, "python -m training.evaluate",
                    ["--model", str(bundle), "--data", f"folder:{root}", "--split-file", str(split), "--device", "cpu",
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "case case03 has class" in err and "segments 1..1" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_sections_are_clean_then_each_noise_once():
    assert [s.name for s in sections((0.0, 0.1, 0.1, 0.2), (0.05,))] == [
        CLEAN, "gaussian 0.1", "gaussian 0.2", "salt-and-pepper 0.05"]
    assert [s.name for s in sections((0.0,), ())] == [CLEAN]


def test_classification_figures_of_known_rows():
    def row(probs, label, u=0.2):
        return {"probabilities": probs, "label": label, "uncertainty": u}

    binary = [row([0.9, 0.1], 0, 0.1), row([0.3, 0.7], 1), row([0.6, 0.4], 1, 0.5), row([0.2, 0.8], 0, 0.6)]
    f = classification_figures(binary, ("no", "yes"), positive=1)
    # predicted 0, 1, 0, 1 against 0, 1, 1, 0: TP 1, FN 1, FP 1, TN 1
    assert f["accuracy"] == 0.5 and f["sensitivity"] == 0.5 and f["specificity"] == 0.5 and f["f1"] == 0.5
    assert f["kappa"] == pytest.approx(0.0) and f["auc"] == 0.5 and f["positive_class"] == "yes"
    assert f["case_uncertainty_mean"] == pytest.approx(0.35)
    # accepted from the least uncertain: right, right, wrong, wrong (risk 0, 0, 1/3, 1/2)
    assert f["aurc"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4)
    multi = [row([0.8, 0.1, 0.1], 0), row([0.1, 0.8, 0.1], 1), row([0.1, 0.1, 0.8], 2), row([0.1, 0.8, 0.1], 2)]
    f = classification_figures(multi, ("a", "b", "c"), positive=2)
    assert f["accuracy"] == 0.75 and "auc" not in f and "sensitivity" not in f and "AUC" in f["not_reported"]
    # per-class F1: a 1, b 2/3, c 2/3; kappa: p_o 3/4, p_e (1*1 + 1*2 + 2*1) / 16 = 5/16
    assert f["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert f["kappa"] == pytest.approx((0.75 - 5 / 16) / (1 - 5 / 16))


def test_segmentation_figures_count_missed_and_false_segments():
    def row(true, predicted, dice=None, assd=None, hd=None):
        return {"segments": {"Lesion": {"label": 1, "true_voxels": true, "predicted_voxels": predicted, "dice": dice,
                                        "assd_mm": assd, "hd95_mm": hd}}}

    rows = [row(10, 8, 0.8, 1.0, 2.0), row(10, 12, 0.6, 3.0, 6.0), row(10, 0, 0.0, float("inf"), float("inf")),
            row(0, 5), row(0, 0)]
    f = segmentation_figures(rows, (Segment(1, "Lesion", (1.0, 0.0, 0.0)),))
    s = f["segments"]["Lesion"]
    assert s["cases_with_segment"] == 3 and s["missed_cases"] == 1 and s["dice_mean"] == pytest.approx(1.4 / 3)
    assert s["assd_mm_mean"] == 2.0 and s["hd95_mm_median"] == 4.0 and s["dice_median"] == 0.6
    assert s["cases_without_segment"] == 2 and s["predicted_where_absent"] == 1 and f["dice_mean"] == s["dice_mean"]


def test_salt_and_pepper_sets_that_fraction_of_pixels_to_each_channels_extremes():
    rng = np.random.default_rng(0)
    channels = [rng.uniform(10, 20, (20, 30)).astype(np.float32), rng.uniform(-5, 5, (20, 30)).astype(np.float32)]
    before = [c.copy() for c in channels]
    noisy = salt_and_pepper(channels, 0.1, noise_rng("case", "salt_and_pepper", 0.1))
    assert all(np.array_equal(a, b) for a, b in zip(channels, before))  # the inputs are untouched
    changed = [n != c for n, c in zip(noisy, channels)]
    assert changed[0].sum() == 60 and np.array_equal(changed[0], changed[1])  # 10 % of 600 pixels, the same in both
    for n, c, moved in zip(noisy, channels, changed):
        assert (moved & (n == c.max())).sum() == 30 and (moved & (n == c.min())).sum() == 30  # half salt, half pepper
    again = salt_and_pepper(channels, 0.1, noise_rng("case", "salt_and_pepper", 0.1))
    assert all(np.array_equal(a, b) for a, b in zip(noisy, again))
    assert np.array_equal(apply_noise(channels, "salt_and_pepper", 0.1, "case")[1], noisy[1])
    assert np.array_equal(apply_noise(channels, "none", 0.0, "case")[0], channels[0])


def test_gaussian_noise_is_the_synthetic_evaluations_noise():
    a = np.random.default_rng(1).uniform(0, 100, (4, 16, 16)).astype(np.float32)
    ours = gaussian_noise([a], 0.1, np.random.default_rng(7))[0]
    theirs = sitk.GetArrayFromImage(add_noise([sitk.GetImageFromArray(a)], 0.1, np.random.default_rng(7))[0])
    assert np.array_equal(ours, theirs)
    lo, hi = np.percentile(a, (0.5, 99.5))
    assert np.std(ours - a) == pytest.approx(0.1 * (hi - lo), rel=0.1)


def test_a_dataset_report_goes_into_the_card_and_the_fits(ispy, tmp_path):
    from training import export, fit

    report = ispy["out"] / "report.json"
    assert export.main(["--base", str(ispy["bundle"]), "--report", str(report), "--out", str(tmp_path / "b")]) == 0
    metrics = load_bundle(tmp_path / "b").card.metrics
    figures = json.loads(report.read_text())["figures"][CLEAN]
    assert metrics["kappa"] == figures["kappa"] and metrics["segments"] == figures["segments"]
    assert metrics["test_set"].startswith(json.loads(report.read_text())["dataset"][:20])
    for what in ("opinion", "review"):
        assert fit.main([what, "--model", str(ispy["bundle"]), "--reports", str(report), "--out",
                         str(tmp_path / what)]) == 0
    card = load_bundle(tmp_path / "opinion").card
    assert card.case_calibration["fitted_on"].startswith("test cases of ispy1:")
