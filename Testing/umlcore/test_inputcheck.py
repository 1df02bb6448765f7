"""``umlcore.inputcheck``: a scan of another kind than the model's (a CT for an MR model) is flagged: verdict review,
one warning line, ``summary.input_check``; ``--strict-input`` refuses it. MR volumes, crops and subtractions pass."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from umlcore.bundle import load_bundle
from umlcore.card import InputSpec
from umlcore.errors import BundleError
from umlcore.inputcheck import input_reasons
from umlcore.predictor import Predictor
from umlcore.synthetic import generate_case


def ct_like(shape=(16, 80, 80), seed=0) -> sitk.Image:
    """Air at -1000 HU around a soft-tissue body at about 40 HU, with lungs at -850."""
    rng = np.random.default_rng(seed)
    a = np.full(shape, -1000.0, np.float32)
    a[:, 15:65, 15:65] = rng.normal(40, 20, (shape[0], 50, 50))
    a[:, 30:45, 20:40] = -850
    image = sitk.GetImageFromArray(a)
    image.SetSpacing((0.8, 0.8, 2.5))
    return image


@pytest.fixture(scope="module")
def mr_model(bundle_factory):
    return load_bundle(bundle_factory(input=InputSpec(modality="MR", body_region="breast")))


def test_a_ct_is_flagged_for_an_mr_model_and_mr_volumes_pass(mr_model):
    reasons = input_reasons(mr_model.card, [ct_like()])
    assert len(reasons) == 1 and "looks like a CT scan" in reasons[0] and "trained on MR" in reasons[0]
    case = generate_case(2_000_000, shape=(16, 96, 96)).to_sitk()
    crop = case[1][10:60, 20:70, :]
    assert input_reasons(mr_model.card, case) == [] and input_reasons(mr_model.card, [crop]) == []
    assert input_reasons(mr_model.card, [case[1] - case[0]]) == []  # a subtraction image
    undeclared = dataclasses.replace(mr_model.card, input=InputSpec())
    assert input_reasons(undeclared, [ct_like()]) == []  # a card that declares no modality is not checked


def test_the_predictor_marks_the_case_for_review_and_says_why(mr_model):
    summary = Predictor(mr_model, device="cpu").predict(ct_like()).summary
    check = summary["input_check"]
    assert check["status"] == "mismatch" and "CT scan" in check["reasons"][0] and check["notes"] == []
    assert summary["classification"]["verdict"] == "review"
    ok = Predictor(mr_model, device="cpu").predict(generate_case(2_000_001, shape=(8, 64, 64)).to_sitk()).summary
    assert ok["input_check"] == {"status": "ok", "reasons": [], "notes": []}


def test_an_unknown_modality_is_refused_in_the_card():
    with pytest.raises(BundleError, match="input.modality must be null or one of"):
        InputSpec(modality="ultrasound")


def test_uml_warns_in_one_line_and_strict_input_refuses(tmp_path):
    """The shipped MR model given a CT: a warning line and verdict review; with --strict-input exit 2, nothing written."""
    ct = tmp_path / "chest-ct.nii.gz"
    sitk.WriteImage(ct_like(), str(ct))
    run = lambda *extra: subprocess.run([sys.executable, "-m", "umlcore", "predict", str(ct), "--device", "cpu",  # noqa: E731
                                         "--progress", "none", *extra], capture_output=True, text=True, timeout=300)
    done = run("-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("uml: warning: case 'chest-ct': the input looks like a CT")
    summary = json.loads((tmp_path / "out" / "chest-ct" / "summary.json").read_text())
    assert summary["input_check"]["status"] == "mismatch" and summary["classification"]["verdict"] == "review"
    strict = run("-o", str(tmp_path / "strict"), "--strict-input")
    assert strict.returncode == 2 and strict.stderr.startswith("uml: error: case 'chest-ct': the input looks like a CT")
    assert strict.stderr.count("\n") == 1 and not (tmp_path / "strict").exists()
