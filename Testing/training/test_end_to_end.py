"""Each --data kind end to end on a dataset in its real layout: a few training steps -> export -> uml predict."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from training import export, train
from training.config import run_tool
from umlcore.bundle import load_bundle
from umlcore.cli import main as uml

from .layouts import KINDS, QUICK, first_test_input, write_folder_pictures

@pytest.fixture(params=list(KINDS))
def trained(request, trained_run):
    return trained_run(request.param)


def test_a_run_exports_a_card_of_its_data_and_uml_predicts_on_its_inputs(trained, tmp_path, capsys):
    kind, root, run, bundle_dir = trained
    card = load_bundle(bundle_dir).card
    info = json.loads((run / "dataset.json").read_text())
    assert card.input.kind == info["input_kind"] and list(card.input.channels) == info["channels"]
    assert list(card.classes) == info["classes"] and [s.name for s in card.segments] == [s["name"] for s in info["segments"]]
    assert card.training["split_sha256"] == info["split_sha256"] and kind in card.training["data"]
    assert card.architecture.num_seg_labels == 1 + len(card.segments)
    inputs = first_test_input(kind, root, run)
    out = tmp_path / "out"
    assert uml(["predict", ",".join(map(str, inputs)), "-o", str(out), "--model", str(bundle_dir), "--device", "cpu",
                "--progress", "none"]) == 0, capsys.readouterr().err
    (case_dir,) = out.iterdir()
    summary = json.loads((case_dir / "summary.json").read_text())
    assert summary["classification"]["classes"] == info["classes"]
    labelmap = sitk.ReadImage(str(case_dir / summary["outputs"]["segmentation"]))
    first = sitk.ReadImage(str(inputs[0]))
    assert labelmap.GetSize()[:2] == first.GetSize()[:2]
    if info["input_kind"] == "picture":
        assert summary["outputs"]["segmentation"] == "segmentation.png" and labelmap.GetDimension() == 2
    assert int(sitk.GetArrayViewFromImage(labelmap).max()) <= len(card.segments)


def test_a_broken_layout_is_one_line_from_train(tmp_path, capsys):
    (tmp_path / "data" / "Training400").mkdir(parents=True)
    code = run_tool(train.cli, "python -m training.train", ["--data", f"refuge:{tmp_path / 'data'}",
                                                             "--out", str(tmp_path / "run"), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("python -m training.train: error: REFUGE") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_torchrun_with_two_processes_follows_the_single_process_loss(tmp_path):
    """Two CPU processes on gloo, each with half of every batch from its shard of the cases, against one process:
    the logged epoch losses agree within 10 %, one process wrote the run, and it exports."""
    root = write_folder_pictures(tmp_path / "data", n=8)
    args = ["-m", "training.train", "--data", f"folder:{root}", "--epochs", "3", "--steps-per-epoch", "4",
            "--batch-size", "4", "--crop", "32", "--workers", "1", "--split-fractions", "0.5", "0.25", "0.25",
            "--device", "cpu", "--threads", "1", "--single-volume-prob", "0"]
    runs = {}
    for name, launcher in (("single", []), ("ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        runs[name] = tmp_path / name
        proc = subprocess.run([sys.executable, *launcher, *args, "--out", str(runs[name])], capture_output=True,
                              text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
        assert proc.returncode == 0, proc.stderr[-2000:]
    losses = {k: np.loadtxt(v / "log.csv", delimiter=",", skiprows=1, usecols=4) for k, v in runs.items()}
    np.testing.assert_allclose(losses["ddp"], losses["single"], rtol=0.1)
    assert (runs["ddp"] / "commands.txt").read_text().count("\n") == 1  # written once, by the first process
    assert export.main(["--run", str(runs["ddp"]), "--out", str(tmp_path / "bundle")]) == 0


def test_a_dataset_run_resumes_with_its_own_split(tmp_path, capsys):
    root = write_folder_pictures(tmp_path / "data", n=8)
    args = ["--data", f"folder:{root}", "--out", str(tmp_path / "run"), *QUICK]
    train.main([*args, "--epochs", "1"])
    split = (tmp_path / "run" / "split.json").read_text()
    state = train.main(["--out", str(tmp_path / "run"), "--resume", "--epochs", "2", "--split-seed", "5"])
    assert state["epoch"] == 2 and "resumed from epoch 1" in capsys.readouterr().out
    assert (tmp_path / "run" / "split.json").read_text() == split  # the run keeps the split it started with
