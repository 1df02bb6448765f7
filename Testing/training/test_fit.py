"""training.fit: each fit writes its card field from evaluated rows, refuses rows of another bundle or card."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from training import fit
from training.config import run_tool
from training.evaluate import card_settings
from umlcore.bundle import load_bundle, save_bundle
from umlcore.card import STACKING_TERMS, ReaderConfig
from umlcore.fusion import calibrate_case_alpha, stack_reader_opinion
from umlcore.reader import LesionReader


@pytest.fixture(scope="module")
def reader_bundle_dir(tiny_bundle, tmp_path_factory):
    torch.manual_seed(0)
    card = dataclasses.replace(tiny_bundle.card, reader=ReaderConfig(width=4, patch_size=16))
    return save_bundle(tiny_bundle.model, card, tmp_path_factory.mktemp("fit") / "reader", reader=LesionReader(9, width=4))


def make_rows(n=600, seed=0, first=1_000_000, inputs=("phases",)):
    """Rows of known structure: the label follows the reader's washout output and the network's probability."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        network = rng.uniform(0.1, 0.9)
        reader = None if i % 5 == 0 else [float(rng.uniform(0.6, 1)), float(rng.uniform()), float(rng.uniform())]
        z = -1.0 + 2.0 * np.log(network / (1 - network)) + (0 if reader is None else 3.0 * (reader[2] - 0.5))
        truth = 300 if i % 2 else 0
        rows.append({"seed": first + i, "input": inputs[i % len(inputs)], "noise": 0.0, "label": int(rng.random() < 1 / (1 + np.exp(-z))),
                     "network_positive_probability": network, "network_uncertainty": 0.2,
                     "reader_probabilities": reader, "lesion_voxels": truth,
                     "components": [{"voxels": 300, "inside": 270.0 if truth else 0.0, "mean_uncertainty": 0.03,
                                     "p_lesion": 0.9 if truth else None},
                                    {"voxels": 100, "inside": 0.0, "mean_uncertainty": 0.2, "p_lesion": 0.6}]})
    return rows


def write_report(path, bundle, rows, split="validation"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": {"sha256": bundle.sha256, "settings": card_settings(bundle.card)},
                                "split": split, "seeds": [rows[0]["seed"], rows[-1]["seed"]], "rows": rows}))
    return path


def run_fit(what, model, reports, out, *extra):
    assert fit.main([what, "--model", str(model), "--reports", *map(str, reports), "--out", str(out), *extra]) == 0
    return load_bundle(out).card


def test_component_filter_and_check_choose_the_best_dice(reader_bundle_dir, tmp_path):
    bundle = load_bundle(reader_bundle_dir)
    report = write_report(tmp_path / "r.json", bundle, make_rows(40))
    card = run_fit("component-filter", reader_bundle_dir, [report], tmp_path / "a")
    assert card.component_max_uncertainty == 0.03  # drops the uncertain false component, keeps the lesion
    assert card.training["fits"]["component_max_uncertainty"]["chosen"] == 0.03
    card = run_fit("check", reader_bundle_dir, [report], tmp_path / "b", "--version", "0.0.2", "--changelog", "check")
    assert card.reader.segmentation_min_lesion == 0.7 and card.version == "0.0.2" and card.changelog == {"0.0.2": "check"}
    assert card.reader.training["check_fit"]["fitted_on"] == "validation seeds 1000000..1000039"


def test_opinion_fits_the_readers_stacked_rule_and_review_reads_it(reader_bundle_dir, tmp_path, capsys):
    bundle = load_bundle(reader_bundle_dir)
    rows = make_rows(1500)
    reports = [write_report(tmp_path / "r1.json", bundle, rows[:700]),
               write_report(tmp_path / "r2.json", bundle, rows[700:], split="test")]
    card = run_fit("opinion", reader_bundle_dir, reports, tmp_path / "a")
    assert "test-split cases are fitting data" in capsys.readouterr().out
    c = card.reader.stacking
    assert set(c) == set(STACKING_TERMS) and all(round(v, 3) == v for v in c.values())
    assert c["network"] > 1.5 and c["washout"] > 0.3 and max(abs(c[t]) for t in ("suspicion", "lesion", "spiculated")) < 0.2
    assert card.reader.training["stacking_fit"]["validation"]["cases"] == 1500
    # review: the threshold from the opinions the fitted rule gives the rows
    card = run_fit("review", tmp_path / "a", [write_report(tmp_path / "r3.json", load_bundle(tmp_path / "a"), rows)],
                   tmp_path / "b")
    record = card.training["fits"]["review_uncertainty"]
    assert card.review_uncertainty == record["chosen"] and 0 <= record["review_share"] < 1
    top = np.array(rows[1]["reader_probabilities"])
    expected = stack_reader_opinion(fit.row_alpha(rows[1]), top, c)
    (got,) = fit._opinions(card, rows[1:2], False)
    np.testing.assert_allclose(got, expected)


def test_without_a_reader_opinion_fits_the_case_calibration_and_single_volume_its_own(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)
    rows = make_rows(300, inputs=("phases", "early", "subtraction"))
    for r in rows:
        r["reader_probabilities"] = None
    report = write_report(tmp_path / "r.json", bundle, rows)
    card = run_fit("opinion", tiny_bundle_dir, [report], tmp_path / "a")
    c = card.case_calibration
    assert c["slope"] > 1.2 and c["fitted_on"].startswith("validation seeds") and c["validation_ece_after"] >= 0
    card = run_fit("single-volume", tmp_path / "a", [report], tmp_path / "b")
    s = card.single_volume_calibration
    assert "early, subtraction" in s["fitted_on"] and card.case_calibration == c
    alpha = calibrate_case_alpha(fit.row_alpha(rows[1]), s["slope"], s["intercept"])
    np.testing.assert_allclose(fit._opinions(card, rows[1:2], True)[0], alpha)


def test_rows_of_other_weights_other_settings_or_twice_are_refused(reader_bundle_dir, tiny_bundle, tmp_path, capsys):
    bundle = load_bundle(reader_bundle_dir)
    rows = make_rows(30)
    good = write_report(tmp_path / "good.json", bundle, rows)
    other = write_report(tmp_path / "other.json", tiny_bundle, rows)
    moved = tmp_path / "moved.json"
    data = json.loads(good.read_text())
    data["model"]["settings"]["component_max_uncertainty"] = 0.5
    moved.write_text(json.dumps(data))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([]))
    lesion_free = write_report(tmp_path / "free.json", bundle, [{**r, "lesion_voxels": 0} for r in rows])
    for what, reports, phrase in (("opinion", [other], "evaluated other weights"),
                                  ("opinion", [empty], "is not a report of python -m training.evaluate"),
                                  ("opinion", [tmp_path / "none.json"], "cannot read"),
                                  ("component-filter", [lesion_free], "no case given as all phases without noise with a lesion"),
                                  ("single-volume", [good], "no case given as one volume"),
                                  ("opinion", [moved], "was made with the card settings"),
                                  ("opinion", [good, good], "is in two of the reports"),
                                  ("check", [other], "evaluated other weights")):
        argv = [what, "--model", str(reader_bundle_dir), "--reports", *map(str, reports), "--out", str(tmp_path / "x")]
        assert run_tool(fit.main, "python -m training.fit", argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m training.fit: error: ") and phrase in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    # the thresholds read the network's raw components and the check's reading: rows of other settings will do
    assert run_fit("check", reader_bundle_dir, [moved], tmp_path / "y").reader.segmentation_min_lesion == 0.7
