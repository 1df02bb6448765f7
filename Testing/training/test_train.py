"""training.train: a few steps on tiny synthetic data lower the loss, write checkpoints, resume, warm-start."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from training import export, train
from umlcore.bundle import load_bundle
from umlcore.errors import UMLInputError
from umlcore.predictor import Predictor


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main([
        "--out", str(out), "--train-cases", "4", "--val-cases", "1", "--case-shape", "8", "48", "48",
        "--epochs", "4", "--steps-per-epoch", "4", "--batch-size", "4", "--crop", "32", "--workers", "1",
        "--warmup-steps", "1", "--lr", "0.003", "--kl-anneal-epochs", "0", "--seed", "0",
    ])
    return out


def test_training_lowers_the_loss_and_writes_checkpoints(run_dir):
    with open(run_dir / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0], losses
    for name in ("best.safetensors", "last.safetensors", "last_optim.safetensors", "last.json",
                 "train_config.json", "model_config.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "train_config.json").read_text())["epochs"] == 4
    # validation logs the pixel u-error AUROC (nan when every sampled voxel is right, as in this tiny run)
    assert all(np.isnan(float(r["pixel_u_auroc"])) or 0.0 <= float(r["pixel_u_auroc"]) <= 1.0 for r in rows)


def test_resume_continues_from_the_last_epoch(run_dir, capsys):
    state = train.main(["--config", str(run_dir / "train_config.json"), "--epochs", "5", "--resume",
                        "--val-cases", "1"])
    assert state["epoch"] == 5
    assert "resumed from epoch 4" in capsys.readouterr().out


def test_init_starts_from_a_bundles_weights(run_dir, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    export.main(["--run", str(run_dir), "--out", str(bundle), "--weights", "last.safetensors"])
    assert load_bundle(bundle).card.training["weights"] == "last.safetensors"
    out = tmp_path / "warm"
    train.main(["--config", str(run_dir / "train_config.json"), "--out", str(out), "--init", str(bundle),
                "--epochs", "1", "--steps-per-epoch", "1", "--val-cases", "1"])
    assert f"initialised from {bundle}" in capsys.readouterr().out
    # a bundle with fewer pools (avg+max) warm-starts an avg+max+lesion run
    plain, short = tmp_path / "plain", ["--epochs", "1", "--steps-per-epoch", "1", "--val-cases", "1"]
    train.main(["--config", str(run_dir / "train_config.json"), "--out", str(plain), "--cls-pool", "avg+max", *short])
    bundle = tmp_path / "plain-bundle"
    export.main(["--run", str(plain), "--out", str(bundle)])
    capsys.readouterr()
    lesion = tmp_path / "lesion"
    train.main(["--config", str(run_dir / "train_config.json"), "--out", str(lesion), "--init", str(bundle),
                "--cls-pool", "avg+max+lesion", *short])
    assert "(instructor.fc.weight: 128 -> 192 inputs, the new ones at 0)" in capsys.readouterr().out
    assert json.loads((lesion / "model_config.json").read_text())["cls_pool"] == "avg+max+lesion"
    # the extended linear layer starts where the bundle was: the same class opinion
    warm = train.UMLNet(train.UMLConfig.preset("small", cls_pool="avg+max+lesion")).eval()
    assert train.init_weights(str(bundle), warm) == ["instructor.fc.weight: 128 -> 192 inputs, the new ones at 0"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(warm(x).cls_alpha, load_bundle(bundle).model.eval()(x).cls_alpha, atol=1e-6)
    # a resume keeps the run's own configuration; one that would build another architecture is refused untouched
    before = (lesion / "train_config.json").read_text()
    train.main(["--out", str(lesion), "--resume", "--epochs", "2"])
    assert json.loads((lesion / "model_config.json").read_text())["cls_pool"] == "avg+max+lesion"
    saved = {k: v for k, v in json.loads((lesion / "train_config.json").read_text()).items() if k != "epochs"}
    assert saved == {k: v for k, v in json.loads(before).items() if k != "epochs"}
    before = (lesion / "train_config.json").read_text()
    with pytest.raises(UMLInputError, match="resume with --config"):
        train.main(["--out", str(lesion), "--resume", "--cls-pool", "avg+max"])
    assert (lesion / "train_config.json").read_text() == before
    with pytest.raises(SystemExit):
        train.parse_args(["--cls-pool", "max"])
    assert "argument --cls-pool: invalid choice: 'max' (choose from 'preset', 'avg'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"  # a mode read from a --config file is checked as well
    bad.write_text(json.dumps({"lesion_sampling": "component"}))
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(bad)])
    assert "--lesion-sampling must be one of slice, lesion, got 'component'" in capsys.readouterr().err
    with pytest.raises(UMLInputError, match="architecture"):
        train.main(["--config", str(run_dir / "train_config.json"), "--out", str(tmp_path / "x"), "--init",
                    str(bundle), "--preset", "paper", "--epochs", "1", "--steps-per-epoch", "1"])


def test_a_run_with_new_cases_per_epoch_slides_its_seeds_and_resumes_the_window(tmp_path, capsys):
    out = tmp_path / "stream"
    args = ["--out", str(out), "--train-cases", "3", "--new-cases-per-epoch", "2", "--val-cases", "1",
            "--case-shape", "6", "32", "32", "--steps-per-epoch", "2", "--batch-size", "2", "--crop", "32",
            "--workers", "1", "--warmup-steps", "1"]
    train.main([*args, "--epochs", "3"])
    text = capsys.readouterr().out
    assert "3 train cases (seeds 0-2)" in text and "2 new cases each epoch" in text
    assert "cases: seeds 2-4" in text and "cases: seeds 4-6" in text
    train.main(["--out", str(out), "--resume", "--epochs", "4"])  # epoch 4 starts where the window was
    text = capsys.readouterr().out
    assert "3 train cases (seeds 6-8)" in text and "resumed from epoch 3" in text and "cases: seeds" not in text
    with pytest.raises(SystemExit):
        train.main([*args, "--new-cases-per-epoch", "4"])
    assert "--new-cases-per-epoch must be from 0" in capsys.readouterr().err


def test_a_2_5d_run_exports_its_context_and_warm_starts_from_a_2d_bundle(run_dir, tmp_path, capsys):
    from umlcore.preprocess import with_context

    flat = tmp_path / "flat-bundle"
    export.main(["--run", str(run_dir), "--out", str(flat), "--weights", "last.safetensors"])
    capsys.readouterr()
    run = tmp_path / "run25d"
    train.main(["--config", str(run_dir / "train_config.json"), "--out", str(run), "--init", str(flat),
                "--context-slices", "1", "--epochs", "1", "--steps-per-epoch", "2", "--val-cases", "1"])
    out = capsys.readouterr().out
    assert "9 input channels (2.5D, +-1 slices)" in out
    assert "cls_encoder.stem.0.weight: 3 -> 9 input channels (2.5D), the neighbouring slices' at 0" in out
    bundle = tmp_path / "bundle25d"
    export.main(["--run", str(run), "--out", str(bundle)])
    card = load_bundle(bundle).card
    assert card.input.context_slices == 1 and card.architecture.in_channels == 9
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 24, 24)).astype(np.float32))
    assert Predictor(load_bundle(bundle), device="cpu").predict(img).summary["slicing"]["context_slices"] == 1
    # the inflated stems start the 2.5D network exactly where the 2D bundle was
    warm = train.UMLNet(train.UMLConfig.preset("small", in_channels=9)).eval()
    notes = train.init_weights(str(flat), warm)
    assert [n.split(":")[0] for n in notes] == ["cls_encoder.stem.0.weight", "seg_encoder.stem.0.weight"]
    stack = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        a, b = warm(with_context(stack, 0, 5, 1)), load_bundle(flat).model.eval()(stack)
    torch.testing.assert_close(a.seg_alpha, b.seg_alpha, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.cls_alpha, b.cls_alpha, rtol=1e-5, atol=1e-5)
    # a 2.5D bundle starts only a run of its own context; a resume cannot change the context
    with pytest.raises(UMLInputError, match="architecture"):
        train.init_weights(str(bundle), train.UMLNet(train.UMLConfig.preset("small", in_channels=15)))
    with pytest.raises(UMLInputError, match="--context-slices"):
        train.main(["--out", str(run), "--resume", "--context-slices", "2"])
    with pytest.raises(SystemExit):
        train.parse_args(["--context-slices", "9"])
    assert "--context-slices must be from 0 (2D) to 8, got 9" in capsys.readouterr().err


TINY = ["--train-cases", "2", "--val-cases", "1", "--case-shape", "4", "32", "32", "--steps-per-epoch", "2",
        "--batch-size", "2", "--crop", "16", "--workers", "1", "--warmup-steps", "1"]


def test_max_minutes_stops_after_the_epoch_that_crosses_it(tmp_path, capsys):
    state = train.main(["--out", str(tmp_path), *TINY, "--epochs", "3", "--max-minutes", "0.0001"])
    assert state["epoch"] == 1 and (tmp_path / "last.json").is_file()
    assert "stopping after epoch 1: --max-minutes 0.0001 reached" in capsys.readouterr().out


def test_stop_after_epoch_keeps_the_schedule_of_all_epochs(tmp_path):
    state = train.main(["--out", str(tmp_path / "a"), *TINY, "--epochs", "4", "--stop-after-epoch", "2"])
    full = tmp_path / "b"
    train.main(["--out", str(full), *TINY, "--epochs", "4"])
    assert state["epoch"] == 2 and state["step"] == 4
    rows = [line.split(",") for line in (tmp_path / "a" / "log.csv").read_text().splitlines()[1:]]
    whole = [line.split(",") for line in (full / "log.csv").read_text().splitlines()[1:]]
    assert [r[2] for r in rows] == [r[2] for r in whole[:2]]  # the learning rate of a 4-epoch schedule
    assert train.main(["--out", str(tmp_path / "a"), "--resume"])["epoch"] == 2  # the run's own settings stop it
    assert train.main(["--out", str(tmp_path / "a"), "--resume", "--stop-after-epoch", "0"])["epoch"] == 4


def test_non_finite_steps_are_skipped_then_refused(tmp_path, monkeypatch):
    real = train.uml_loss

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        return {**losses, "total": losses["total"] * float("nan")}

    monkeypatch.setattr(train, "uml_loss", poisoned)
    with pytest.raises(UMLInputError, match="21 steps with a non-finite loss or gradient.*lower --lr or use --amp off"):
        train.main(["--out", str(tmp_path), *TINY, "--epochs", "1", "--steps-per-epoch", "25"])


def test_validation_runs_without_tf32_convolutions(tiny_bundle, monkeypatch):
    from training.slices import case_from_synthetic
    from umlcore.synthetic import generate_case

    seen, real = [], train.predict_volume
    monkeypatch.setattr(train, "predict_volume",
                        lambda *a, **k: seen.append(torch.backends.cudnn.allow_tf32) or real(*a, **k))
    case = case_from_synthetic(generate_case(3, shape=(6, 32, 32)), tiny_bundle.card.input.normalization)
    train.validate(tiny_bundle.model, [case], torch.device("cpu"))
    assert seen == [False]  # on CUDA the validation metrics then match the predictor's fp32 outputs

