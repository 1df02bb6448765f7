"""training/compare_reports.py: pooling report chunks by seed, the per-side figures and the paired Dice and
case-opinion differences, checked on hand-made rows."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "training"))

import compare_reports  # noqa: E402
from umlcore import metrics  # noqa: E402


def _row(seed, dice, voxels, predicted, p, label):
    return {"seed": seed, "dice": dice, "lesion_voxels": voxels, "predicted_voxels": predicted,
            "positive_probability": p, "label": label}


# A: 3 lesion cases and 1 lesion-free case with a false component; B: better on seed 1, worse on seed 3.
ROWS_A = [_row(1, 0.5, 50, 10, 0.8, 1), _row(2, 0.9, 2000, 1900, 0.3, 0), _row(3, 0.0, 500, 0, 0.6, 1),
          _row(4, None, 0, 12, 0.2, 0)]
ROWS_B = [_row(1, 0.7, 50, 20, 0.9, 1), _row(2, 0.9, 2000, 1900, 0.1, 0), _row(3, 0.0, 500, 0, 0.4, 1),
          _row(4, None, 0, 0, 0.2, 0)]


def _write(tmp_path, name, rows):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"cases": rows, "summary": {}}))
    return path


def test_side_summary_hand_values():
    s = compare_reports.side_summary(ROWS_A)
    assert s["lesion_cases"] == 3 and s["lesion_free_cases"] == 1
    assert s["dice_mean"] == pytest.approx(1.4 / 3)
    assert s["dice_median"] == pytest.approx(0.5)
    sizes = {k: (v["cases"], v["dice_mean"]) for k, v in s["dice_by_lesion_size"].items()}
    assert sizes == {"1-99": (1, 0.5), "100-999": (1, 0.0), ">=1000": (1, 0.9)}
    assert s["lesion_cases_nothing_segmented"] == 1 and s["lesion_free_segmented"] == 1
    # positives 0.8, 0.6 against negatives 0.3, 0.2: every pair ordered
    assert s["auc"] == pytest.approx(1.0)
    assert s["brier"] == pytest.approx((0.2 ** 2 + 0.3 ** 2 + 0.4 ** 2 + 0.2 ** 2) / 4)


def test_paired_opinion_hand_values():
    o = compare_reports.paired_opinion(ROWS_A, ROWS_B)
    # per case, B's NLL minus A's is log(p_A / p_B) of the true class: 0.8/0.9, 0.7/0.9, 0.6/0.4, 0.8/0.8
    expected = np.mean(np.log([0.8 / 0.9, 0.7 / 0.9, 0.6 / 0.4, 1.0]))
    assert o["cases"] == 4 and o["nll"] == pytest.approx(expected)
    assert o["nll"] == pytest.approx(metrics.nll(np.array([r["positive_probability"] for r in ROWS_B]), [1, 0, 1, 0])
                                     - metrics.nll(np.array([r["positive_probability"] for r in ROWS_A]), [1, 0, 1, 0]))
    assert o["nll_ci95"][0] <= o["nll"] <= o["nll_ci95"][1]
    assert o["auc"] == pytest.approx(0.0)  # both order every positive above every negative
    one_class = compare_reports.paired_opinion(ROWS_A[:1], ROWS_B[:1])  # a positive only: no AUC, an NLL
    assert one_class["auc"] is None and one_class["auc_ci95"] is None
    assert one_class["nll"] == pytest.approx(np.log(0.8 / 0.9))


def test_compare_pools_chunks_and_pairs_by_seed(tmp_path, capsys):
    a = _write(tmp_path, "a", ROWS_A)
    b1, b2 = _write(tmp_path, "b1", ROWS_B[:2]), _write(tmp_path, "b2", ROWS_B[2:] + [_row(9, 0.1, 80, 5, 0.5, 1)])
    out = tmp_path / "cmp.json"
    result = compare_reports.main(["--a", str(a), "--b", str(b1), str(b2), "--names", "old", "new",
                                   "--out", str(out)])
    assert result["cases"] == 4 and result["seeds"] == [1, 4]  # seed 9 is on one side only
    d = result["paired_dice_b_minus_a"]
    assert d["cases"] == 3 and d["mean"] == pytest.approx(0.2 / 3)
    assert d["b_better"] == 1 and d["a_better"] == 0
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert json.loads(out.read_text())["names"] == ["old", "new"]
    text = capsys.readouterr().out
    assert "| new | 0.533 |" in text and "paired Dice new - old: +0.067" in text
    assert "paired case opinion new - old over 4 cases: NLL" in text


def test_errors_name_the_problem(tmp_path):
    a = _write(tmp_path, "a", ROWS_A)
    with pytest.raises(SystemExit, match="seed 1 is in two of the reports"):
        compare_reports.main(["--a", str(a), str(a), "--b", str(a)])
    other = _write(tmp_path, "other", [_row(7, 0.5, 50, 10, 0.8, 1)])
    with pytest.raises(SystemExit, match="share no seed"):
        compare_reports.main(["--a", str(a), "--b", str(other)])
    changed = _write(tmp_path, "changed", [_row(1, 0.5, 52, 10, 0.8, 1)])
    with pytest.raises(SystemExit, match="seed 1 is a different case"):
        compare_reports.main(["--a", str(a), "--b", str(changed)])
    near = _write(tmp_path, "near", [_row(2, 0.8, 1990, 1900, 0.3, 0)])  # 0.5 %: the same case
    assert compare_reports.main(["--a", str(a), "--b", str(near)])["cases_size_inexact"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="not an evaluate.py report.json"):
        compare_reports.main(["--a", str(bad), "--b", str(a)])
