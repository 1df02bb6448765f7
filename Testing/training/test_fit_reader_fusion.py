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
