"""training.export: a new bundle from a run, a base bundle with a new network, reader, figures or alignment."""

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import save_file

from training import export, train
from training.config import run_tool
from umlcore.bundle import load_bundle, save_bundle
from umlcore.card import ReaderConfig
from umlcore.predictor import Predictor
from umlcore.reader import LesionReader


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main(["--out", str(out), "--train-cases", "2", "--val-cases", "1", "--case-shape", "4", "32", "32",
                "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--crop", "16", "--workers", "1",
                "--warmup-steps", "1"])
    return out


@pytest.fixture(scope="module")
def reader_run(tmp_path_factory):
    """A folder as python -m training.train_reader leaves it (a reader of 8-pixel-wide first stage)."""
    out = tmp_path_factory.mktemp("reader")
    torch.manual_seed(0)
    save_file(LesionReader(9, width=8).state_dict(), str(out / "reader.safetensors"))
    section = dataclasses.asdict(ReaderConfig(width=8, patch_size=16, training={"command": "test"}))
    (out / "reader.json").write_text(json.dumps(section))
    return out


def test_a_run_becomes_a_bundle_that_predicts(run_dir, tmp_path):
    assert export.main(["--run", str(run_dir), "--out", str(tmp_path / "b"), "--id", "tiny-test",
                        "--changelog", "first"]) == 0
    bundle = load_bundle(tmp_path / "b")
    card = bundle.card
    assert (card.id, card.version, card.changelog) == ("tiny-test", "1.0.0", {"1.0.0": "first"})
    assert card.training["command"].startswith("python -m training.train --out ") and card.training["weights"] == "best.safetensors"
    assert card.reader is None and card.metrics == {} and card.classes == ("low suspicion", "high suspicion")
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 24, 24)).astype(np.float32))
    assert sitk.GetArrayFromImage(Predictor(bundle, device="cpu").predict(img).labelmap).shape == (4, 24, 24)


def test_a_new_network_on_a_base_card_keeps_its_fits_and_empties_its_metrics(run_dir, tiny_bundle, tmp_path):
    fitted = dataclasses.replace(tiny_bundle.card, component_max_uncertainty=0.08, review_uncertainty=0.25,
                                 metrics={"dice_mean": 0.5}, training={"command": "the old run"})
    base = save_bundle(tiny_bundle.model, fitted, tmp_path / "base")
    assert export.main(["--base", str(base), "--run", str(run_dir), "--weights", "last.safetensors", "--version", "0.0.2",
                        "--out", str(tmp_path / "new")]) == 0
    card = load_bundle(tmp_path / "new").card
    assert (card.component_max_uncertainty, card.review_uncertainty, card.metrics) == (0.08, 0.25, {})
    assert card.training["init"] == {"command": "the old run"} and card.training["weights"] == "last.safetensors"
    assert card.version == "0.0.2" and card.id == "test-model"


def test_a_reader_joins_unfitted_and_keeps_the_bases_check(tiny_bundle, reader_run, tmp_path):
    checked = dataclasses.replace(tiny_bundle.card, reader=ReaderConfig(width=4, patch_size=16, segmentation_min_lesion=0.6),
                                  case_calibration=None)
    base = save_bundle(tiny_bundle.model, checked, tmp_path / "base", reader=LesionReader(9, width=4))
    assert export.main(["--base", str(base), "--reader", str(reader_run), "--out", str(tmp_path / "b")]) == 0
    bundle = load_bundle(tmp_path / "b")
    r = bundle.card.reader
    assert (r.width, r.stacking, r.segmentation_min_lesion, r.training) == (8, None, 0.6, {"command": "test"})
    assert sum(p.numel() for p in bundle.reader.parameters()) != sum(p.numel() for p in LesionReader(9, width=4).parameters())
    # a folder that holds no finished reader run, or a reader of another shape
    assert run_tool(export.main, "x", ["--base", str(base), "--reader", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "reader.json").write_text((reader_run / "reader.json").read_text().replace('"width": 8', '"width": 4'))
    (wrong / "reader.safetensors").write_bytes((reader_run / "reader.safetensors").read_bytes())
    assert run_tool(export.main, "x", ["--base", str(base), "--reader", str(wrong), "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


def test_a_report_writes_the_figures_and_alignment_is_set(tiny_bundle_dir, tiny_bundle, tmp_path, capsys):
    report = tmp_path / "report.json"
    figures = {"cases": 4, "dice_mean": 0.7, "auc": 0.9}
    report.write_text(json.dumps({"model": {"sha256": tiny_bundle.sha256}, "dataset": "4 cases",
                                  "command": "python -m training.evaluate ...",
                                  "figures": {"phases": figures, "early": {"cases": 4, "auc": 0.6}}}))
    assert export.main(["--base", str(tiny_bundle_dir), "--report", str(report), "--motion-correction", "early",
                        "--spacing-mm", "0.5", "4", "--out", str(tmp_path / "b")]) == 0
    card = load_bundle(tmp_path / "b").card
    assert card.metrics["dice_mean"] == 0.7 and card.metrics["test_set"] == "4 cases"
    assert card.metrics["single_volume"]["early"] == {"cases": 4, "auc": 0.6}
    assert card.input.motion_correction.mode == "translation" and card.input.motion_reference == 1
    assert card.input.spacing_mm == (0.5, 4.0)
    other = tmp_path / "other.json"
    other.write_text(report.read_text().replace(tiny_bundle.sha256, "0" * 64))
    base = ["--base", str(tiny_bundle_dir)]
    for argv, phrase in (([*base, "--motion-correction", "t2"], "must name one of the channels"),
                         ([*base, "--report", str(other)], "measured other weights"),
                         ([*base, "--report", str(tmp_path / "none.json")], "cannot read"),
                         ([*base, "--report", str(report), "--reader", str(tmp_path)], "export the new networks first"),
                         ([*base, "--run", str(tmp_path)], "give --version"),
                         ([], "give --run")):
        assert run_tool(export.main, "python -m training.export", [*argv, "--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert phrase in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()
