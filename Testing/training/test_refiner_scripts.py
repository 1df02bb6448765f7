"""The refiner scripts (train_refiner.py, add_refiner.py, evaluate.py's pairing) and probe_missed_lesions.py on the shipped model."""

import csv
import json
import sys
from pathlib import Path

import pytest

from umlcore.bundle import load_bundle
from umlcore.refiner import RefinerConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "training"))
import add_refiner  # noqa: E402
import train_refiner  # noqa: E402

SHIPPED = ROOT / "Resources" / "Models" / "uml-breast-dce-small"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("refiner") / "run"
    # seed 3,000,000 has a lesion the shipped model segments (one crop); validation on the same case
    assert train_refiner.main(["--model", str(SHIPPED), "--out", str(out), "--train-cases", "1", "--val-cases", "1",
                               "--val-from", "3000000", "--steps", "2", "--val-every", "1", "--batch", "2",
                               "--workers", "1", "--threads", "1"]) == 0
    return out


def test_train_refiner_writes_weights_card_and_log(trained):
    card = json.loads((trained / "refiner.json").read_text())
    cfg = RefinerConfig(**card)
    assert cfg.crop == (12, 48, 48) and cfg.training["training_crops"] == 1 and cfg.training["steps"] == 2
    assert (trained / "refiner.safetensors").is_file() and len(list((trained / "crops").glob("*.npz"))) == 1
    rows = list(csv.DictReader((trained / "log.csv").open()))
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    # untrained, the refiner redraws each component exactly as the network drew it
    assert float(rows[0]["crop_dice_after"]) == pytest.approx(float(rows[0]["crop_dice_before"]), abs=1e-3)
    assert float(rows[0]["case_dice_after"]) == pytest.approx(float(rows[0]["case_dice_before"]), abs=1e-3)
    assert 0.5 < float(rows[0]["case_dice_before"]) <= 1.0
    v = json.loads((trained / "refiner.json").read_text())["training"]["validation"]
    assert v["case_dice_before"] < v["case_dice_oracle"] <= 1.0  # the oracle draws the true lesion it touches


def test_train_refiner_checks_its_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_refiner.main(["--model", str(SHIPPED), "--out", str(tmp_path), "--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_add_refiner_puts_it_in_a_bundle_then_its_metrics(trained, tmp_path, capsys):
    out = tmp_path / "v"
    assert add_refiner.main(["--model", str(SHIPPED), "--refiner", str(trained), "--version", "9.9.9",
                             "--out", str(out)]) == 0
    b, shipped = load_bundle(out), load_bundle(SHIPPED)
    assert b.refiner is not None and b.card.refiner.training["training_crops"] == 1 and b.card.version == "9.9.9"
    assert b.card.reader == shipped.card.reader and b.card.case_calibration == shipped.card.case_calibration
    assert "lesion refiner" in b.card.description and b.card.description.endswith("not for diagnosis.")
    report = tmp_path / "report.json"
    summary = {"dice_mean": 0.8, "auc": 0.9, "segmentation_min_lesion": 0.75}
    report.write_text(json.dumps({"model": {"sha256": "0" * 64}, "dataset": "d", "command": "c", "summary": summary}))
    with pytest.raises(SystemExit):
        add_refiner.main(["--model", str(out), "--report", str(report), "--out", str(tmp_path / "w")])
    assert "evaluated another bundle" in capsys.readouterr().err
    report.write_text(json.dumps({"model": {"sha256": b.sha256}, "dataset": "d", "command": "c",
                                  "summary": {**summary, "case_calibration": {"slope": 1, "intercept": 0}}}))
    with pytest.raises(SystemExit):
        add_refiner.main(["--model", str(out), "--report", str(report), "--out", str(tmp_path / "w")])
    assert "refitted a case calibration" in capsys.readouterr().err
    report.write_text(json.dumps({"model": {"sha256": b.sha256}, "dataset": "d", "command": "c", "summary": summary}))
    card = json.loads((out / "model.json").read_text())  # a single-volume calibration's figures, as
    card["metrics"]["single_volume"] = {"early": {"cases": 3, "ece": 0.04}}  # calibrate_single_volume.py writes them
    (out / "model.json").write_text(json.dumps(card))
    assert add_refiner.main(["--model", str(out), "--report", str(report), "--out", str(tmp_path / "w")]) == 0
    m = load_bundle(tmp_path / "w").card.metrics
    assert m["dice_mean"] == 0.8 and "segmentation_min_lesion" not in m
    assert m["single_volume"] == {"early": {"cases": 3, "ece": 0.04}}  # carried over: same network
    with pytest.raises(SystemExit):
        add_refiner.main(["--model", str(SHIPPED), "--report", str(report), "--out", str(tmp_path / "x")])
    assert "has no refiner" in capsys.readouterr().err


def test_evaluate_pairs_the_dice_with_and_without_the_refiner(trained, tmp_path):
    import evaluate

    bundle = tmp_path / "v"
    assert add_refiner.main(["--model", str(SHIPPED), "--refiner", str(trained), "--out", str(bundle)]) == 0
    out = tmp_path / "eval"
    # seeds 3,000,002 and 3,000,003: lesions the refiner redraws (1.12.0 draws 3,000,001's larger than its crop)
    assert evaluate.main(["--model", str(bundle), "--out", str(out), "--cases", "2", "--test-seeds-from", "3000002",
                          "--robustness-cases", "1", "--mode-cases", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    rows, r = report["cases"], report["summary"]["refiner"]
    assert all(row["dice_unrefined"] is not None and row["components_refined"] >= 1 for row in rows)
    assert r["cases"] == 2 and r["dice_mean_with"] == pytest.approx(report["summary"]["dice_mean"])
    assert r["dice_mean_without"] == pytest.approx(sum(row["dice_unrefined"] for row in rows) / 2)
    assert r["dice_difference"] == pytest.approx(r["dice_mean_with"] - r["dice_mean_without"])
    assert "The refiner on the same 2 lesion cases" in (out / "report.md").read_text()


def test_refiner_effect_is_paired_by_case():
    import evaluate

    rows = [{"dice": 0.8, "dice_unrefined": 0.6, "lesion_voxels": 50, "predicted_voxels": 40,
             "predicted_voxels_unrefined": 30, "components_refined": 1},
            {"dice": 0.5, "dice_unrefined": 0.6, "lesion_voxels": 2000, "predicted_voxels": 9,
             "predicted_voxels_unrefined": 9, "components_refined": 2},
            {"dice": None, "dice_unrefined": None, "lesion_voxels": 0, "predicted_voxels": 0,
             "predicted_voxels_unrefined": 0, "components_refined": 0}]
    r = evaluate.refiner_effect(rows)
    assert r["cases"] == 2 and r["components_refined"] == 3 and (r["cases_better"], r["cases_worse"]) == (1, 1)
    assert r["dice_mean_without"] == pytest.approx(0.6) and r["dice_mean_with"] == pytest.approx(0.65)
    lo, hi = r["dice_difference_95"]
    assert r["dice_difference"] == pytest.approx(0.05) and lo == pytest.approx(-0.1) and hi == pytest.approx(0.2)
    assert r["dice_by_lesion_size_without"]["1-99"] == {"cases": 1, "dice_mean": 0.6, "nothing_predicted": 0}
    assert evaluate.refiner_effect(rows[2:]) is None


def test_probe_missed_lesions_ranks_each_true_lesion_on_the_subtraction(tmp_path):
    import probe_missed_lesions as probe

    out = tmp_path / "r.json"
    assert probe.main(["--model", str(SHIPPED), "--cases", "1", "--seed-from", "3000000", "--workers", "1",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["seed"] == 3000000 and row["lesions"] and all(x["voxels"] >= probe.MIN_VOXELS for x in row["lesions"])
    assert any(x["segmented"] for x in row["lesions"])  # the lesion the refiner tests redraw
    assert all(0.0 <= x["share_brighter"] < 1.0 for x in row["lesions"])
    rows = [{"seed": 1, "lesions": [{"voxels": 10, "segmented": False, "share_brighter": 0.02},
                                    {"voxels": 30, "segmented": False, "share_brighter": 0.0005},
                                    {"voxels": 500, "segmented": True, "share_brighter": 0.00001}]}]
    s = probe.summarise(rows)
    assert s["lesions"] == 3 and s["missed"]["lesions"] == 2 and s["missed"]["voxels_median"] == 20
    assert s["missed"]["within_brightest"] == {"0.01 %": 0, "0.1 %": 1, "1 %": 1}
    assert s["segmented"]["within_brightest"] == {"0.01 %": 1, "0.1 %": 1, "1 %": 1}
    assert s["missed"]["share_brighter_quartiles"][1] == pytest.approx(0.01025)
