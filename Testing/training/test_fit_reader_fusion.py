"""training/fit_reader_fusion.py: pooling the case rows of evaluate reports, the weight rule, the bundle it writes,
and add_reader keeping that calibration for a test-only report."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "training"))

import add_reader  # noqa: E402
import fit_reader_fusion  # noqa: E402

from umlcore.bundle import load_bundle  # noqa: E402
from umlcore.reader import LesionReader  # noqa: E402


@pytest.fixture(scope="module")
def reader_bundle(tiny_bundle_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit-fusion")
    torch.manual_seed(0)
    save_file(LesionReader(9).state_dict(), str(tmp / "roinet.safetensors"))
    assert add_reader.main(["--model", str(tiny_bundle_dir), "--reader", str(tmp / "roinet.safetensors"),
                            "--out", str(tmp / "with-reader")]) == 0
    return tmp / "with-reader"


def _rows(seeds, rng):
    """Rows as evaluate.py writes them: an informative network, a more informative reader (independent)."""
    rows = []
    for seed in seeds:
        y = int(rng.integers(0, 2))
        net = 1 / (1 + np.exp(-(1.0 * (2 * y - 1) + rng.normal(0, 1.5))))
        score = 1 / (1 + np.exp(-(2.0 * (2 * y - 1) + rng.normal(0, 1.5))))
        rows.append({"seed": int(seed), "network_positive_probability": float(np.clip(net, 0.2, 0.8)),
                     "uncertainty": 0.4, "reader_score": float(score), "label": y})
    return rows


def _report(path, bundle, validation, cases, sha=None):
    path.write_text(json.dumps({
        "model": {"sha256": sha or bundle.sha256},
        "summary": {"component_max_uncertainty": bundle.card.component_max_uncertainty},
        "dataset": "400 synthetic cases, seeds 2000000..2000399, shape (6, 32, 32), label noise 0.0 (metrics ...)",
        "validation_cases": validation, "cases": cases}))
    return path


def test_pooled_rows_deduplicate_seeds_and_refuse_other_reports(reader_bundle, tmp_path):
    bundle = load_bundle(reader_bundle)
    rng = np.random.default_rng(0)
    val, a, b = _rows(range(1_000_000, 1_000_050), rng), _rows(range(2_000_000, 2_000_050), rng), \
        _rows(range(2_000_050, 2_000_100), rng)
    first, second = _report(tmp_path / "1.json", bundle, val, a), _report(tmp_path / "2.json", bundle, val, b)

    def error(msg):
        raise SystemExit(msg)

    rows, groups = fit_reader_fusion.pooled_rows([first, second], bundle, error)
    assert len(rows) == 150 and [len(i) for i in groups.values()] == [50, 50, 50]  # the shared validation rows once
    assert list(groups)[0] == "validation"
    changed = [dict(val[0], reader_score=0.123)] + val[1:]
    for path, why in ((_report(tmp_path / "3.json", bundle, changed, []), "another row"),
                      (_report(tmp_path / "4.json", bundle, val, a, sha="0" * 64), "other weights"),
                      (_report(tmp_path / "5.json", bundle, [dict(val[0], network_positive_probability=None)], []),
                       "lack the network's opinion")):
        with pytest.raises(SystemExit, match=why):
            fit_reader_fusion.pooled_rows([first, path], bundle, error)


def test_fit_writes_the_weight_and_calibration_and_add_reader_keeps_them(reader_bundle, tmp_path, capsys):
    bundle = load_bundle(reader_bundle)
    rng = np.random.default_rng(1)
    reports = [_report(tmp_path / "1.json", bundle, _rows(range(1_000_000, 1_000_300), rng),
                       _rows(range(2_000_000, 2_000_300), rng))]
    out = tmp_path / "fitted"
    assert fit_reader_fusion.main(["--model", str(reader_bundle), "--reports", *map(str, reports), "--version", "9.9.9",
                                   "--out", str(out), "--ece-max", "0.2"]) == 0
    card = load_bundle(out).card
    fit = card.reader.training["weight_fit"]
    assert card.version == "9.9.9" and card.reader.fusion == "evidence" and card.reader.weight > 0
    assert card.case_calibration["fitted_on"] == fit["fitted_on"] and fit["fitted_on"].startswith("600 cases")
    table = fit["validation"]["evidence"]
    eligible = {w: r["nll"] for w, r in table.items() if r["ece"] <= 0.2}
    assert str(card.reader.weight) in eligible  # (the group ECEs are in the printout, not the card)
    # the independent reader carries most of the information: a weight near 1, not 0
    assert 0.5 <= card.reader.weight <= 1.5
    # nothing qualifies: nothing is written
    assert fit_reader_fusion.main(["--model", str(reader_bundle), "--reports", *map(str, reports),
                                   "--out", str(tmp_path / "none"), "--ece-max", "0"]) == 1
    assert not (tmp_path / "none").exists() and "nothing written" in capsys.readouterr().out
    # a test-only report of the fitted bundle (no case_calibration) keeps the calibration fitted with the weight
    test_only = tmp_path / "test.json"
    test_only.write_text(json.dumps({"model": {"sha256": load_bundle(out).sha256}, "command": "evaluate",
                                     "dataset": "test", "summary": {"auc": 0.9}}))
    assert add_reader.main(["--model", str(out), "--report", str(test_only), "--out", str(tmp_path / "final")]) == 0
    final = load_bundle(tmp_path / "final").card
    assert final.case_calibration == card.case_calibration and final.metrics["auc"] == 0.9
    # ... but not a calibration fitted before the reader's weight
    with pytest.raises(SystemExit):
        add_reader.main(["--model", str(reader_bundle), "--report", str(_report(tmp_path / "x.json", bundle, [], [])),
                         "--out", str(tmp_path / "bad")])
    assert "not fitted together with its reader weight" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def _stacked_rows(seeds, rng, coefficients):
    """Rows whose labels follow a known stacked model of random network and reader probabilities."""
    from umlcore.fusion import STACKING_TERMS, stacking_features

    rows = []
    for seed in seeds:
        net = float(rng.uniform(0.05, 0.95))
        read = rng.random() < 0.8
        heads = [float(v) for v in rng.uniform(0.02, 0.98, 3)] if read else None
        z = float(np.dot([coefficients[t] for t in STACKING_TERMS], stacking_features(net, heads)))
        label = int(rng.random() < 1 / (1 + np.exp(-z)))
        rows.append({"seed": int(seed), "network_positive_probability": net, "uncertainty": 0.4,
                     "reader_score": None if heads is None else heads[0] * (1 - (1 - heads[1]) * (1 - heads[2])),
                     "reader_probabilities": heads, "label": label})
    return rows


def test_fit_stacked_recovers_the_coefficients_and_writes_an_identity_calibration(reader_bundle, tmp_path, capsys):
    bundle = load_bundle(reader_bundle)
    truth = {"intercept": -0.5, "network": 0.3, "suspicion": 1.0, "lesion": 0.2, "spiculated": -0.4, "washout": 0.0}
    rng = np.random.default_rng(3)
    rows = _stacked_rows(range(1_000_000, 1_003_000), rng, truth)
    fitted = fit_reader_fusion.fit_stacking(rows, l2=0.0)
    assert list(fitted) == list(truth)
    for term, value in truth.items():
        assert fitted[term] == pytest.approx(value, abs=0.2), term
    report = _report(tmp_path / "1.json", bundle, rows[:1500], rows[1500:])
    out = tmp_path / "stacked"
    assert fit_reader_fusion.main(["--model", str(reader_bundle), "--reports", str(report), "--fusion", "stacked",
                                   "--ece-max", "0.1", "--version", "9.9.9", "--out", str(out)]) == 0
    card = load_bundle(out).card
    assert card.version == "9.9.9" and card.reader.fusion == "stacked" and card.reader.weight == 1.0
    assert card.reader.stacking == pytest.approx(fit_reader_fusion.fit_stacking(rows, l2=1e-3))
    assert (card.case_calibration["slope"], card.case_calibration["intercept"]) == (1.0, 0.0)
    assert card.reader.training["weight_fit"]["fitted_on"].startswith("3000 cases")
    from umlcore.cli import main as uml  # `uml info` lists the coefficients instead of a weight

    capsys.readouterr()
    assert uml(["info", str(out)]) == 0
    assert "rule stacked, intercept " in capsys.readouterr().out
    # add_reader step 2 with a test-only report keeps that calibration (fitted together with the coefficients)
    test_only = tmp_path / "test.json"
    test_only.write_text(json.dumps({"model": {"sha256": load_bundle(out).sha256}, "command": "evaluate",
                                     "dataset": "test", "summary": {"auc": 0.9}}))
    assert add_reader.main(["--model", str(out), "--report", str(test_only), "--out", str(tmp_path / "final")]) == 0
    final = load_bundle(tmp_path / "final").card
    assert final.case_calibration == card.case_calibration and final.reader == card.reader
    # ECE over the bar: nothing written
    assert fit_reader_fusion.main(["--model", str(reader_bundle), "--reports", str(report), "--fusion", "stacked",
                                   "--ece-max", "0", "--out", str(tmp_path / "none")]) == 1
    assert not (tmp_path / "none").exists() and "nothing written" in capsys.readouterr().out
    # rows without the reader's three probabilities (reports written before the field): refused with the fix
    old = _report(tmp_path / "old.json", bundle, [{k: v for k, v in r.items() if k != "reader_probabilities"}
                                                   for r in rows[:100]], [])
    with pytest.raises(SystemExit):
        fit_reader_fusion.main(["--model", str(reader_bundle), "--reports", str(old), "--fusion", "stacked",
                                "--out", str(tmp_path / "old")])
    assert "rescore those reports with training/rescore_reader.py" in capsys.readouterr().err
    assert not (tmp_path / "old").exists()


def test_review_threshold_is_kept_unless_fitted_on_the_pooled_opinions(reader_bundle, tmp_path, capsys):
    from evaluate import card_opinions, suggest_review_uncertainty

    bundle = load_bundle(reader_bundle)
    truth = {"intercept": -0.5, "network": 0.3, "suspicion": 1.0, "lesion": 0.2, "spiculated": -0.4, "washout": 0.0}
    rows = _stacked_rows(range(1_000_000, 1_000_800), np.random.default_rng(5), truth)
    report = _report(tmp_path / "1.json", bundle, rows[:400], rows[400:])
    args = ["--model", str(reader_bundle), "--reports", str(report), "--fusion", "stacked", "--ece-max", "1"]
    assert fit_reader_fusion.main([*args, "--out", str(tmp_path / "kept")]) == 0
    assert load_bundle(tmp_path / "kept").card.review_uncertainty == bundle.card.review_uncertainty
    assert "the card keeps" in capsys.readouterr().out
    assert fit_reader_fusion.main([*args, "--review-uncertainty", "fit", "--out", str(tmp_path / "fit")]) == 0
    card = load_bundle(tmp_path / "fit").card
    # by hand: the opinions the written card's predictor gives these rows, and evaluate.py's rule on them
    mine = card_opinions(rows, card)
    u = np.array([r["uncertainty"] for r in mine])
    correct = np.array([(r["positive_probability"] >= 0.5) == bool(r["label"]) for r in mine], dtype=int)
    assert card.review_uncertainty == suggest_review_uncertainty(u, correct)
    assert card.review_uncertainty != bundle.card.review_uncertainty
    assert f"suggest {card.review_uncertainty:g}; written" in capsys.readouterr().out
