"""A few training steps on tiny synthetic data lower the loss and give a bundle that loads and predicts."""

import copy
import csv
import dataclasses
import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import SimpleITK as sitk
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "training"))

import add_reader  # noqa: E402
import calibrate_single_volume  # noqa: E402
import evaluate  # noqa: E402
import export  # noqa: E402
import probe_features  # noqa: E402
import probe_roi  # noqa: E402
import probe_single_volume  # noqa: E402
import replace_network  # noqa: E402
import train  # noqa: E402

from umlcore.bundle import MotionCorrection, load_bundle, save_bundle  # noqa: E402
from umlcore.predictor import Predictor  # noqa: E402


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


def test_export_writes_a_loadable_bundle_that_predicts(run_dir, tmp_path):
    out = tmp_path / "bundle"
    assert export.main(["--run", str(run_dir), "--out", str(out), "--id", "tiny-test"]) == 0
    bundle = load_bundle(out)
    assert bundle.card.id == "tiny-test"
    assert bundle.card.training["command"].startswith("python training/train.py")
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 24, 24)).astype(np.float32))
    pred = Predictor(bundle, device="cpu").predict(img)
    assert sitk.GetArrayFromImage(pred.labelmap).shape == (4, 24, 24)
    with pytest.raises(SystemExit) as exc:
        export.main(["--run", str(run_dir), "--out", str(tmp_path / "b"), "--component-max-uncertainty", "1.5"])
    assert exc.value.code == 2 and not (tmp_path / "b").exists()


def test_export_refuses_a_folder_without_a_run(tmp_path):
    with pytest.raises(SystemExit) as exc:
        export.main(["--run", str(tmp_path), "--out", str(tmp_path / "b")])
    assert exc.value.code == 2


def test_replace_network_puts_a_fine_tuned_network_into_a_copy_of_the_bundle(run_dir, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    export.main(["--run", str(run_dir), "--out", str(bundle), "--version", "1.0.0"])
    before = load_bundle(bundle)
    out = tmp_path / "new"
    assert replace_network.main(["--model", str(bundle), "--run", str(run_dir), "--weights", "last.safetensors",
                                 "--version", "1.1.0", "--out", str(out)]) == 0
    new = load_bundle(out)
    last = load_file(str(run_dir / "last.safetensors"))
    assert all(torch.equal(v, last[k]) for k, v in new.model.state_dict().items())
    assert new.card.version == "1.1.0" and new.card.metrics == {} and new.sha256 != before.sha256
    assert new.card.training["weights"] == "last.safetensors" and new.card.training["init"] == before.card.training
    assert new.card.architecture == before.card.architecture and new.card.review_uncertainty == before.card.review_uncertainty
    assert "measure this bundle" in capsys.readouterr().out
    # another architecture, an existing --out, a missing run: refused with the fix, nothing written
    other = tmp_path / "other-run"
    other.mkdir()
    for name in ("last.safetensors", "train_config.json"):
        (other / name).write_bytes((run_dir / name).read_bytes())
    arch = json.loads((run_dir / "model_config.json").read_text())
    arch["cls_head_width"] = arch["cls_head_width"] * 2
    (other / "model_config.json").write_text(json.dumps(arch))
    for argv, message in (([str(bundle), str(other), str(tmp_path / "x")], "trained another architecture"),
                          ([str(bundle), str(run_dir), str(out)], "exists: add --overwrite"),
                          ([str(bundle), str(tmp_path), str(tmp_path / "y")], "is missing")):
        with pytest.raises(SystemExit) as exc:
            replace_network.main(["--model", argv[0], "--run", argv[1], "--version", "2", "--out", argv[2]])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_evaluate_writes_reports_and_export_takes_its_metrics(run_dir, tmp_path):
    bundle = tmp_path / "bundle"
    export.main(["--run", str(run_dir), "--out", str(bundle)])
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(bundle), "--out", str(out), "--cases", "4", "--shape", "6", "32", "32",
                          "--robustness-cases", "2", "--mode-cases", "2", "--label-noise", "0.0",
                          "--calibrate-cases", "2"]) == 0  # validation seeds 1000000-1: labels 0 and 1
    text = (out / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: undefined metrics are null
    report = json.loads(text)
    assert report["summary"]["cases"] == 4 and [r["sigma"] for r in report["robustness"]] == [0.0, 0.05, 0.1, 0.2]
    assert report["summary"]["test_time_augmentation"] == "none"
    assert set(report["input_modes"]) == {"phases", "early", "subtraction"}
    assert [r["seed"] for r in report["cases"]] == [2_000_000 + i for i in range(4)]
    assert [r["seed"] for r in report["validation_cases"]] == [1_000_000, 1_000_001]  # what the calibration saw
    assert sum(b["cases"] for b in report["summary"]["dice_by_lesion_size"].values()) == \
        report["summary"]["cases_with_lesion"] == sum(r["lesion_voxels"] > 0 for r in report["cases"])
    assert (out / "report.md").read_text().startswith("# Evaluation of")
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    free = [r["predicted_voxels"] > 0 for r in report["cases"] if r["lesion_voxels"] == 0]
    assert report["summary"]["lesion_free_segmented"] == (sum(free) / len(free) if free else None)
    assert report["summary"]["segmentation_min_lesion"] is None  # this bundle has no reader
    final = tmp_path / "final"
    export.main(["--run", str(run_dir), "--out", str(final), "--report", str(out / "report.json")])
    card = load_bundle(final).card
    assert card.metrics["cases"] == 4 and card.review_uncertainty == report["summary"]["suggested_review_uncertainty"]
    assert set(report["summary"]["component_filter_validation_dice"]) == {"none", *map(str, evaluate.COMPONENT_THRESHOLDS)}
    assert card.component_max_uncertainty == report["summary"]["component_max_uncertainty"]
    assert card.case_calibration["slope"] == report["summary"]["case_calibration"]["slope"]
    assert "component_max_uncertainty" not in card.metrics and "case_calibration" not in card.metrics
    assert card.test_time_augmentation == "none" and "test_time_augmentation" not in card.metrics
    # a report measured with another rule (evaluate.py --test-time-augmentation) gives the card that rule
    mirrored = tmp_path / "mirrored.json"
    assert card.input.motion_correction == MotionCorrection() and "motion_correction" not in card.metrics
    motion = {"mode": "translation", "reference": "early", "max_shift_mm": 6.0}  # and evaluate.py --motion-correction
    mirrored.write_text(json.dumps({**report, "summary": {**report["summary"], "test_time_augmentation": "flip_hw",
                                                          "motion_correction": motion}}))
    export.main(["--run", str(run_dir), "--out", str(tmp_path / "final-hw"), "--report", str(mirrored)])
    card = load_bundle(tmp_path / "final-hw").card
    assert card.test_time_augmentation == "flip_hw" and card.input.motion_correction == MotionCorrection(**motion)


def test_calibration_can_keep_the_bundles_component_filter(bundle_factory, tmp_path):
    bundle = bundle_factory(component_max_uncertainty=0.2)
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(bundle), "--out", str(out), "--cases", "2", "--shape", "6", "32", "32",
                          "--robustness-cases", "1", "--mode-cases", "1", "--label-noise", "0.0",
                          "--calibrate-cases", "2", "--component-filter", "bundle",
                          "--test-time-augmentation", "flip_w"]) == 0
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["component_max_uncertainty"] == 0.2  # kept, not refitted
    assert summary["test_time_augmentation"] == "flip_w"  # this run's rule, not the card's ("none")
    assert "component_filter_validation_dice" not in summary
    assert summary["case_calibration"]["fitted_on"].startswith("2 validation cases")
    with pytest.raises(SystemExit) as exc:  # without a calibration fit the option would do nothing
        evaluate.main(["--model", str(bundle), "--out", str(tmp_path / "e2"), "--component-filter", "bundle"])
    assert exc.value.code == 2 and not (tmp_path / "e2").exists()


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
    with pytest.raises(SystemExit, match="resume with --config"):
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
    with pytest.raises(SystemExit, match="architecture"):
        train.main(["--config", str(run_dir / "train_config.json"), "--out", str(tmp_path / "x"), "--init",
                    str(bundle), "--preset", "paper", "--epochs", "1", "--steps-per-epoch", "1"])


def test_slice_sampler_batches_are_seeded_and_oversample_lesions():
    from slices import SliceSampler, case_from_synthetic
    from umlcore.bundle import Normalization
    from umlcore.synthetic import generate_case

    cases = [case_from_synthetic(generate_case(s, shape=(8, 48, 48), lesion_prob=1.0), Normalization())
             for s in range(3)]
    batches = [SliceSampler(cases, crop=32, lesion_fraction=1.0, seed=4).batch(6) for _ in range(2)]
    x, seg, cls = batches[0]
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert seg.shape == (6, 32, 32) and seg.dtype == torch.int64 and cls.shape == (6,)
    assert all(torch.equal(a, b) for a, b in zip(*batches))  # same seed, same batch
    assert (seg.flatten(1).amax(1) > 0).float().mean() >= 0.5  # lesion slices, crops mostly keep the lesion
    with pytest.raises(ValueError, match="multiple of 8"):
        SliceSampler(cases, crop=30)


def test_slice_sampler_advance_slides_its_window_of_cases():
    from slices import SliceSampler, VolumeCase

    def case(value: float, lesion_slice: int) -> VolumeCase:
        mask = np.zeros((4, 16, 16), np.uint8)
        mask[lesion_slice, 4:8, 4:8] = 1
        return VolumeCase(f"c{value}", np.full((3, 4, 16, 16), value, np.float32), np.zeros((0, 4, 16, 16), np.float32),
                          mask, 1, 1, (1.0, 1.0, 1.0))

    for mode in ("slice", "lesion"):
        sampler = SliceSampler([case(0, 0), case(1, 1), case(2, 2)], crop=16, seed=0, lesion_sampling=mode)
        sampler.advance([case(3, 3), case(4, 0)])
        assert [float(c[0, 0, 0, 0]) for c in sampler.channels] == [2, 3, 4]  # the two oldest gave way
        assert len(sampler.all_slices) == 12 and len(sampler.masks) == len(sampler.labels) == 3
        assert sampler.lesion_slices == [(0, 2), (1, 3), (2, 0)]  # the draw tables index the new window
        picks = {(i, z) for i, z, _ in (sampler._pick() for _ in range(300))}
        assert {(0, 2), (1, 3), (2, 0)} <= picks and all(i < 3 for i, _ in picks)
        with pytest.raises(ValueError, match="at most"):
            sampler.advance([case(5, 0)] * 4)


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


def test_slice_sampler_keeps_the_order_of_the_phases_and_replicated_volumes_identical():
    """The photometric augmentation must not scramble the kinetics (late vs early) the case label is read from."""
    from slices import SliceSampler, VolumeCase

    levels = np.array([0.3, 0.5, 0.6], np.float32)  # pre < early < late (+20 %), like persistent enhancement
    channels = np.broadcast_to(levels[:, None, None, None], (3, 4, 32, 32)).copy()
    case = VolumeCase("flat", channels, channels[1:2].copy(), np.zeros((4, 32, 32), np.uint8), 0, 0, (1.0, 1.0, 1.0))
    x, _, _ = SliceSampler([case], crop=32, single_volume_prob=0.0, seed=1).batch(64)
    means = x.mean(dim=(2, 3))
    assert bool((means[:, 2] > means[:, 1]).all()) and bool((means[:, 1] > means[:, 0]).all())
    x, _, _ = SliceSampler([case], crop=32, single_volume_prob=1.0, seed=1).batch(16)
    spread = x.mean(dim=(2, 3)).amax(1) - x.mean(dim=(2, 3)).amin(1)
    assert float(spread.max()) < 0.02  # one volume replicated: the channels differ only by their pixel noise
    with pytest.raises(ValueError, match="channel_jitter"):
        SliceSampler([case], crop=32, channel_jitter=0.7)


def test_slice_sampler_lesion_sampling_draws_every_lesion_equally():
    """A lesion over 8 slices and one on the last of them: "slice" draws that slice 1 time in 8 (and centres the
    crop on any of its 404 lesion pixels), "lesion" draws the small lesion 1 time in 2, with its own pixels."""
    from slices import SliceSampler, VolumeCase

    mask = np.zeros((10, 64, 64), np.uint8)
    mask[0:8, 30:50, 30:50] = 1  # large
    mask[7, 4:6, 4:6] = 1  # small, on the large one's last slice (not touching it)
    image = np.zeros((3, 10, 64, 64), np.float32)
    case = VolumeCase("two", image, image[1:2].copy(), mask, 1, 1, (1.0, 1.0, 1.0))
    sampler = SliceSampler([case], crop=16, lesion_fraction=1.0, seed=3, lesion_sampling="slice")
    picks = [sampler._pick() for _ in range(4000)]
    assert np.mean([z == 7 for _, z, _ in picks]) == pytest.approx(1 / 8, abs=0.03)
    assert {len(pixels) for _, z, pixels in picks if z == 7} == {404}
    sampler = SliceSampler([case], crop=16, lesion_fraction=1.0, seed=3, lesion_sampling="lesion")
    picks = [sampler._pick() for _ in range(4000)]
    small = [(z, len(pixels)) for _, z, pixels in picks if (pixels[:, 1] < 10).all()]
    assert len(small) / len(picks) == pytest.approx(1 / 2, abs=0.03)
    assert set(small) == {(7, 4)}  # the small lesion's own pixels, not the large one's
    with pytest.raises(ValueError, match="lesion_sampling must be 'slice' or 'lesion'"):
        SliceSampler([case], crop=16, lesion_sampling="component")


def test_slice_sampler_context_slices_follow_the_predictors_order_and_share_a_phases_scale():
    """2.5D samples: channel 3c + 1 + d is phase c of slice z + d (edges repeated), and the per-phase jitter is the
    same for a phase's three slices, so the slice-to-slice change of every phase is the same factor."""
    from slices import SliceSampler, VolumeCase

    levels = np.array([0.3, 0.5, 0.6], np.float32)[:, None]
    ramp = 1.0 + 0.1 * np.arange(6, dtype=np.float32)[None, :]  # brighter with z
    channels = np.broadcast_to((levels * ramp)[:, :, None, None], (3, 6, 32, 32)).copy()
    case = VolumeCase("ramp", channels, channels[1:2].copy(), np.zeros((6, 32, 32), np.uint8), 0, 0, (1.0, 1.0, 3.0))
    x, _, _ = SliceSampler([case], crop=32, single_volume_prob=0.0, noise_max=0.0, seed=5, context_slices=1).batch(64)
    assert x.shape == (64, 9, 32, 32)
    m = x.mean(dim=(2, 3)).double().view(64, 3, 3)  # (sample, phase, slice z-1 / z / z+1)
    assert bool((m[:, :, 0] <= m[:, :, 1]).all()) and bool((m[:, :, 1] <= m[:, :, 2]).all())
    edges = (m[:, 0, 0] == m[:, 0, 1]) | (m[:, 0, 1] == m[:, 0, 2])
    assert 0 < int(edges.sum()) < 64  # first / last slices repeat themselves, inner ones do not
    ratio = m[:, :, 2] / m[:, :, 1]
    torch.testing.assert_close(ratio, ratio[:, :1].expand(-1, 3), rtol=1e-5, atol=0)
    assert bool((m[:, 2, 1] > m[:, 1, 1]).all())  # phases keep their order
    x, _, _ = SliceSampler([case], crop=32, single_volume_prob=1.0, noise_max=0.0, seed=5, context_slices=1).batch(8)
    m = x.mean(dim=(2, 3)).view(8, 3, 3)
    assert torch.equal(m[:, 0], m[:, 1]) and torch.equal(m[:, 0], m[:, 2])  # one volume: every phase the same
    with pytest.raises(ValueError, match="context_slices"):
        SliceSampler([case], crop=32, context_slices=9)


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
    export.main(["--run", str(run), "--out", str(bundle), "--component-max-uncertainty", "0.08"])
    card = load_bundle(bundle).card
    assert card.component_max_uncertainty == 0.08
    assert card.input.context_slices == 1 and card.architecture.in_channels == 9 and "2.5D" in card.name
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
    with pytest.raises(SystemExit, match="architecture"):
        train.init_weights(str(bundle), train.UMLNet(train.UMLConfig.preset("small", in_channels=15)))
    with pytest.raises(SystemExit, match="--context-slices"):
        train.main(["--out", str(run), "--resume", "--context-slices", "2"])
    with pytest.raises(SystemExit):
        train.parse_args(["--context-slices", "9"])
    assert "--context-slices must be from 0 (2D) to 8, got 9" in capsys.readouterr().err


def test_slice_sampler_noise_level_is_drawn_up_to_noise_max():
    from slices import SliceSampler, VolumeCase

    flat = np.full((3, 4, 32, 32), 0.5, np.float32)  # a flat image: the pixel spread is the added noise alone
    case = VolumeCase("flat", flat, flat[1:2].copy(), np.zeros((4, 32, 32), np.uint8), 0, 0, (1.0, 1.0, 1.0))
    for noise_max in (0.0, 0.03, 0.2):
        x, _, _ = SliceSampler([case], crop=32, seed=2, noise_max=noise_max).batch(64)
        sigma = x.std(dim=(2, 3))  # (64, 3): one sigma per sample, shared by its channels
        assert float(sigma.max()) <= noise_max * 1.05 + 1e-6
        assert float(sigma.max()) >= noise_max * 0.85  # 64 draws of U[0, noise_max] reach near the top
    with pytest.raises(ValueError, match="noise_max"):
        SliceSampler([case], crop=32, noise_max=1.5)


def test_phases_as_read_moves_the_phases_as_a_motion_correcting_predictor_does(monkeypatch):
    """Training tools cut patches and crops from the phases the predictor read: for a card with motion correction,
    the generator's moved pre-contrast phase comes back where the unmoved case has it (seed 5: 1.1 / -0.9 voxels)."""
    import umlcore.synthetic as syn
    from scipy import ndimage
    from slices import phases_as_read
    from umlcore.bundle import InputSpec, MotionCorrection
    from umlcore.synthetic import generate_case

    moved = generate_case(5, shape=(16, 96, 96))
    before = moved.phases.copy()
    monkeypatch.setattr(syn, "_shift_axis", lambda a, shift, axis: a)  # the same draws, without the motion
    still = generate_case(5, shape=(16, 96, 96))
    plain = InputSpec(channels=("pre", "early", "late"))
    assert phases_as_read(moved, plain) is moved  # no motion correction: the case as generated

    read = phases_as_read(moved, dataclasses.replace(plain, motion_correction=MotionCorrection("translation", "early")))
    assert read.phases.shape == moved.phases.shape and read.phases.dtype == np.float32
    np.testing.assert_array_equal(read.phases[1], moved.phases[1])  # the reference phase as given
    assert read.mask is moved.mask and np.array_equal(moved.phases, before)  # the input case is left as it was

    def off(x):  # smoothed, so that interpolated noise does not count
        smooth = (0, 1.5, 1.5)
        return float(np.abs(ndimage.gaussian_filter(x.astype(np.float64), smooth)
                            - ndimage.gaussian_filter(still.phases[0].astype(np.float64), smooth)).mean())

    assert off(read.phases[0]) < 0.4 * off(moved.phases[0])  # measured: 4.1 against 22.4


def test_phases_as_read_takes_the_predictors_shifts_from_its_summary(tiny_bundle, monkeypatch):
    """Given the predictor's summary of the case, the same phases come back without estimating the shifts again."""
    import umlcore.registration as registration
    import slices
    from umlcore.bundle import MotionCorrection
    from umlcore.predictor import Predictor
    from umlcore.synthetic import generate_case

    spec = dataclasses.replace(tiny_bundle.card.input, motion_correction=MotionCorrection("translation", "early"))
    case = generate_case(5, shape=(16, 96, 96))
    summary = Predictor(dataclasses.replace(tiny_bundle, card=dataclasses.replace(tiny_bundle.card, input=spec)),
                        device="cpu").predict(case.to_sitk()).summary
    assert [p["applied"] for p in summary["motion_correction"]["phases"]] == [True, True]
    estimated = slices.phases_as_read(case, spec)

    def refuse(*args):
        raise AssertionError("estimated again")

    monkeypatch.setattr(registration, "estimate_translation", refuse)
    np.testing.assert_array_equal(slices.phases_as_read(case, spec, summary).phases, estimated.phases)
    with pytest.raises(AssertionError, match="estimated again"):
        slices.phases_as_read(case, spec)


def test_dice_by_lesion_size_bins_cases_by_their_true_lesion():
    rows = [{"lesion_voxels": v, "dice": d, "predicted_voxels": p}
            for v, d, p in [(0, None, 5), (40, 0.0, 0), (60, 0.5, 10), (400, 0.8, 300), (5000, 0.9, 4800)]]
    bins = evaluate.dice_by_lesion_size(rows)
    assert bins == {"1-99": {"cases": 2, "dice_mean": 0.25, "nothing_predicted": 1},
                    "100-999": {"cases": 1, "dice_mean": 0.8, "nothing_predicted": 0},
                    ">=1000": {"cases": 1, "dice_mean": 0.9, "nothing_predicted": 0}}


def test_errors_by_phenotype_groups_cases_by_the_label_rule():
    def row(lesions, margin, kinetics, p, label, score):
        return {"lesions": lesions, "margin": margin, "kinetics": kinetics, "positive_probability": p,
                "label": label, "clean_label": label, "reader_score": score}

    rows = [row(0, None, None, 0.2, 0, None), row(0, None, None, 0.7, 0, 0.9),
            row(1, "spiculated", "persistent", 0.4, 1, 0.3), row(2, "spiculated", "washout", 0.9, 1, 0.99),
            row(1, "smooth", "plateau", 0.1, 0, 0.1), row(1, "lobulated", "persistent", 0.6, 0, 0.5)]
    t = evaluate.errors_by_phenotype(rows)
    assert list(t) == ["no lesion", "smooth/lobulated, no washout", "spiculated, no washout", "washout"]
    assert t["no lesion"] == {"cases": 2, "suspicious": 0, "accuracy": 0.5, "mean_probability": pytest.approx(0.45),
                              "reader_read": 1, "reader_score_median": 0.9}
    assert t["smooth/lobulated, no washout"]["accuracy"] == 0.5
    assert t["smooth/lobulated, no washout"]["reader_score_median"] == pytest.approx(0.3)
    assert t["spiculated, no washout"]["accuracy"] == 0.0 and t["washout"]["suspicious"] == 1
    assert np.isnan(evaluate.errors_by_phenotype(rows[:1])["washout"]["accuracy"])


def test_ece_sampling_floor_is_the_noise_of_a_calibrated_model():
    # p = 0.5 everywhere: the ECE is |fraction of positives - 0.5|, whose median over Binomial(100, 0.5) draws is 0.03
    assert evaluate.ece_sampling_floor(np.full(100, 0.5)) == pytest.approx(0.03, abs=0.011)
    assert evaluate.ece_sampling_floor(np.full(10000, 0.5), draws=50) < 0.005  # many cases: the floor vanishes
    assert evaluate.ece_sampling_floor(np.array([0.0, 1.0] * 50)) == 0.0  # certain and right: no noise


def test_json_safe_turns_undefined_metrics_into_null():
    assert evaluate.json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2, "e": "x"}}) == \
        {"a": None, "b": [1.0, None], "c": {"d": 2, "e": "x"}}


def test_evaluation_cases_are_the_same_with_worker_processes():
    serial = list(evaluate.synthetic_stream(range(5, 8), (6, 32, 32), 0.0))
    parallel = list(evaluate.synthetic_stream(range(5, 8), (6, 32, 32), 0.0, workers=2))
    assert [c.seed for c in parallel] == [5, 6, 7]
    assert all(np.array_equal(a.phases, b.phases) and a.label == b.label for a, b in zip(serial, parallel))
    stream = evaluate.synthetic_stream(range(20), (6, 32, 32), 0.0, workers=2)
    assert next(stream).seed == 0
    stream.close()  # abandoned early: the worker processes go with it
    assert not multiprocessing.active_children()


def test_component_threshold_is_the_one_with_the_best_validation_dice():
    lesion = np.array([[100, 0.02, 90], [40, 0.09, 0], [10, 0.25, 0]])  # (voxels, mean u, voxels in truth)
    small = np.array([[12, 0.11, 8], [30, 0.2, 0]])
    best, table = evaluate.choose_component_threshold([(lesion, 100), (small, 10), (np.zeros((0, 3)), 0)])
    assert table["none"] == pytest.approx(np.mean([180 / 250, 16 / 52]))
    assert best == 0.12 and table["0.12"] == pytest.approx(np.mean([180 / 240, 16 / 22]))  # 0.15 ties: first wins
    assert evaluate.choose_component_threshold([(np.array([[10, 0.5, 10]]), 10)])[0] is None  # nothing to gain


def test_diagnose_classifier_reports_the_three_fusions(tiny_bundle_dir, capsys):
    import diagnose_classifier

    assert diagnose_classifier.main(["--model", str(tiny_bundle_dir), "--cases", "3", "--shape", "6", "32", "32",
                                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 validation cases (seeds 1000100..1000102)")
    assert all(f"{name} " in out for name in ("shipped", "oracle", "best_slice"))


def test_component_stats_gives_size_mean_uncertainty_and_overlap_per_component():
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[0, 1:3, 1:3] = 1
    labels[2, 5, 5] = 1
    u = np.full(labels.shape, 0.5, np.float32)
    u[0, 1:3, 1:3] = 0.1
    truth = np.zeros_like(labels)
    truth[0, 1, 1] = 1
    np.testing.assert_allclose(evaluate.component_stats(labels, u, truth), [[4, 0.1, 1], [1, 0.5, 0]], rtol=1e-6)
    assert evaluate.component_stats(np.zeros_like(labels), u, truth).shape == (0, 3)


TINY = ["--train-cases", "2", "--val-cases", "1", "--case-shape", "4", "32", "32", "--steps-per-epoch", "2",
        "--batch-size", "2", "--crop", "16", "--workers", "1", "--warmup-steps", "1"]


def test_max_minutes_stops_after_the_epoch_that_crosses_it(tmp_path, capsys):
    state = train.main(["--out", str(tmp_path), *TINY, "--epochs", "3", "--max-minutes", "0.0001"])
    assert state["epoch"] == 1 and (tmp_path / "last.json").is_file()
    assert "stopping after epoch 1: --max-minutes 0.0001 reached" in capsys.readouterr().out


def test_non_finite_steps_are_skipped_then_refused(tmp_path, monkeypatch):
    real = train.uml_loss

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        return {**losses, "total": losses["total"] * float("nan")}

    monkeypatch.setattr(train, "uml_loss", poisoned)
    with pytest.raises(SystemExit, match="21 steps with a non-finite loss or gradient.*lower --lr or use --amp off"):
        train.main(["--out", str(tmp_path), *TINY, "--epochs", "1", "--steps-per-epoch", "25"])


def test_single_volume_calibration_is_fitted_measured_and_exported(bundle_factory, tmp_path):
    three = {"slope": 0.5, "intercept": 0.2}
    bundle = bundle_factory(seed=5, case_calibration=three)  # untrained; seed 5 ranks these 6 fitting cases rightly
    out, exported = tmp_path / "sv", tmp_path / "bundle"
    assert calibrate_single_volume.main([
        "--model", str(bundle), "--out", str(out), "--fit-cases", "3", "--test-cases", "2", "--modes", "early",
        "subtraction", "--shape", "6", "32", "32", "--label-noise", "0.0", "--export", str(exported),
        "--version", "0.0.2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [(r["mode"], r["seed"]) for r in report["fit_cases"]] == \
        [("early", 1_000_000 + i) for i in range(3)] + [("subtraction", 1_000_003 + i) for i in range(3)]
    assert [(r["mode"], r["seed"]) for r in report["test_cases"]] == \
        [(m, 2_000_000 + i) for m in ("early", "subtraction") for i in range(2)]
    new = report["single_volume_calibration"]
    assert new["slope"] > 0 and new["fitted_on"].startswith("3 validation cases per input mode (early, subtraction)")
    assert set(report["test"]) == {"early", "subtraction"} and report["test"]["early"]["after"]["cases"] == 2
    card = load_bundle(exported).card
    assert card.version == "0.0.2" and card.case_calibration == three and card.single_volume_calibration == new
    assert load_bundle(exported).sha256 == load_bundle(bundle).sha256  # same weights
    assert card.metrics["single_volume"]["early"] == report["test"]["early"]["after"]
    # the exported bundle's predictor gives the recorded calibrated probabilities
    row = report["test_cases"][-1]
    case = next(evaluate.synthetic_stream(range(row["seed"], row["seed"] + 1), (6, 32, 32), 0.0))
    for b, key in ((exported, "positive_probability_after"), (bundle, "positive_probability_before")):
        pred = Predictor(load_bundle(b), device="cpu").predict(evaluate.input_views(case.to_sitk(), "subtraction"))
        assert pred.summary["classification"]["positive_probability"] == pytest.approx(row[key], abs=1e-9)


def test_single_volume_calibration_can_keep_the_cards_own_and_exports_the_reader(tiny_bundle, tmp_path):
    """``--export-calibration kept`` re-measures the card's single-volume calibration (e.g. after its network was
    replaced) and writes its figures; the bundle's reader travels with the export."""
    from umlcore.reader import LesionReader, ReaderConfig

    kept = {"slope": 0.3, "intercept": -0.2, "fitted_on": "another network"}
    card = dataclasses.replace(tiny_bundle.card, reader=ReaderConfig(), single_volume_calibration=kept)
    torch.manual_seed(3)
    src = save_bundle(tiny_bundle.model, card, tmp_path / "src", reader=LesionReader(9))
    out, exported = tmp_path / "sv", tmp_path / "bundle"
    assert calibrate_single_volume.main([
        "--model", str(src), "--out", str(out), "--fit-cases", "2", "--test-cases", "2", "--modes", "early",
        "subtraction", "--shape", "6", "32", "32", "--label-noise", "0.0", "--export", str(exported),
        "--version", "0.0.3", "--export-calibration", "kept"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kept_single_volume_calibration"] == kept
    assert set(report["test"]["early"]) == {"before", "kept", "after"}
    assert "| ECE kept |" in (out / "report.md").read_text()
    row = report["test_cases"][0]
    assert row["positive_probability_kept"] == pytest.approx(calibrate_single_volume.recalibrate([row], kept)[0])
    b = load_bundle(exported)
    assert b.card.single_volume_calibration == kept and b.card.version == "0.0.3"
    assert b.card.metrics["single_volume"]["subtraction"] == report["test"]["subtraction"]["kept"]
    src_reader = load_bundle(src).reader.state_dict()
    assert all(torch.equal(v, src_reader[k]) for k, v in b.reader.state_dict().items())


def test_single_volume_calibration_cannot_keep_what_the_card_lacks(bundle_factory, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        calibrate_single_volume.main(["--model", str(bundle_factory()), "--out", str(tmp_path / "o"),
                                      "--export", str(tmp_path / "b"), "--version", "2",
                                      "--export-calibration", "kept"])
    assert exc.value.code == 2 and "has no single_volume_calibration to keep" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exc:
        calibrate_single_volume.main(["--model", str(bundle_factory()), "--out", str(tmp_path / "o"),
                                      "--export-calibration", "kept"])
    assert exc.value.code == 2 and "give --export FOLDER too" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_single_volume_calibration_refuses_an_export_without_a_new_version(bundle_factory, tmp_path):
    with pytest.raises(SystemExit) as exc:
        calibrate_single_volume.main(["--model", str(bundle_factory()), "--out", str(tmp_path / "o"),
                                      "--export", str(tmp_path / "b")])
    assert exc.value.code == 2 and not (tmp_path / "o").exists()


def test_single_volume_calibration_refuses_opinions_that_rank_the_classes_backwards(bundle_factory, tmp_path,
                                                                                     capsys, monkeypatch):
    real = calibrate_single_volume.evaluate_cases

    def backwards(*args, **kwargs):  # the cases' opinions, made to rank the classes the wrong way round
        res = real(*args, **kwargs)
        for r in res["_rows"]:
            r["positive_probability"] = 0.7 - 0.4 * r["label"]
        return res

    monkeypatch.setattr(calibrate_single_volume, "evaluate_cases", backwards)
    with pytest.raises(SystemExit) as exc:
        calibrate_single_volume.main(["--model", str(bundle_factory(seed=0)), "--out", str(tmp_path / "o"),
                                      "--fit-cases", "3", "--test-cases", "1", "--modes", "early", "subtraction",
                                      "--shape", "6", "32", "32", "--label-noise", "0.0",
                                      "--export", str(tmp_path / "b"), "--version", "2"])
    assert exc.value.code == 2 and "the fitted slope is" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "b").exists()


def test_validation_runs_without_tf32_convolutions(tiny_bundle, monkeypatch):
    from slices import case_from_synthetic
    from umlcore.synthetic import generate_case

    seen, real = [], train.predict_volume
    monkeypatch.setattr(train, "predict_volume",
                        lambda *a, **k: seen.append(torch.backends.cudnn.allow_tf32) or real(*a, **k))
    case = case_from_synthetic(generate_case(3, shape=(6, 32, 32)), tiny_bundle.card.input.normalization)
    train.validate(tiny_bundle.model, [case], torch.device("cpu"))
    assert seen == [False]  # on CUDA the validation metrics then match the predictor's fp32 outputs


def test_probe_features_reproduce_the_instructors_pooled_vector(tiny_bundle):
    """The probe's ``instructor`` pool is exactly what the network's linear layer reads."""
    from umlcore.evidential import alpha_from_logits

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    pooled, mask = probe_features.slice_features(tiny_bundle.model, x)
    with torch.inference_mode():
        expected = tiny_bundle.model(x).cls_alpha
        got = alpha_from_logits(tiny_bundle.model.instructor.fc(torch.from_numpy(pooled["instructor"])))
    torch.testing.assert_close(got, expected)
    assert set(pooled) == set(probe_features.POOLS) and mask.shape == (2, 32, 32) and mask.dtype == bool
    assert all(np.isfinite(v).all() and v.shape[0] == 2 for v in pooled.values())


def test_probe_logistic_regression_separates_a_separable_feature_and_ignores_noise():
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    x = np.stack([y + 0.3 * rng.standard_normal(60), rng.standard_normal(60)], axis=1)
    p = probe_features.fit_logistic(x, y, l2=0.01)(x)
    assert p.shape == (60,) and ((p > 0.5) == y).mean() > 0.9
    noise_only = probe_features.fit_logistic(x[:, 1:], y, l2=1.0)(x[:, 1:])
    assert np.abs(noise_only - 0.5).max() < 0.1  # a strong penalty and no signal: close to the base rate


def test_probe_features_refuses_too_few_cases(tiny_bundle_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        probe_features.main(["--model", str(tiny_bundle_dir), "--out", str(tmp_path), "--fit-cases", "5"])
    assert "at least 20" in capsys.readouterr().err


def test_probe_features_writes_a_report_and_reuses_its_feature_cache(tiny_bundle_dir, tmp_path, capsys):
    args = ["--model", str(tiny_bundle_dir), "--out", str(tmp_path), "--fit-cases", "20", "--test-cases", "20",
            "--shape", "6", "48", "48", "--l2", "1.0"]
    assert probe_features.main(args) == 0
    report = json.loads((tmp_path / "probe.json").read_text())
    assert report["fit_cases"] == 20 and report["test_cases"] == 20
    assert set(report["test_auc"]) == {"label", "spiculated", "washout"}
    assert "instructor+seg0_ring" in report["test_auc"]["label"]
    assert set(report["shape_auc"]) == {"predicted", "true"}
    stamp = (tmp_path / "features.npz").stat().st_mtime_ns
    assert "cases," in capsys.readouterr().out
    assert probe_features.main(args) == 0  # second run: features from the cache, nothing recomputed
    assert (tmp_path / "features.npz").stat().st_mtime_ns == stamp and "cases," not in capsys.readouterr().out
    other_shape = args[:-6] + ["--shape", "6", "40", "40", "--l2", "1.0"]
    assert probe_features.main(other_shape) == 0  # other settings: computed afresh, not read from the cache
    assert "cases," in capsys.readouterr().out and not (tmp_path / "features.partial.npz").exists()


def test_irregularity_is_near_zero_for_a_ball_and_large_for_a_spiky_star():
    z, y, x = np.mgrid[-10:11, -10:11, -10:11]
    ball = x ** 2 + y ** 2 + z ** 2 <= 64
    star = x ** 2 + y ** 2 + z ** 2 <= 4
    star[10, 10, :] = star[10, :, 10] = star[:, 10, 10] = True  # three thin orthogonal spikes through the centre
    assert probe_features.irregularity(ball, (1.0, 1.0, 1.0)) < 0.2
    assert probe_features.irregularity(star, (1.0, 1.0, 1.0)) > 0.8
    assert probe_features.irregularity(np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0)) == 0.0


def test_roi_patch_samples_1_mm_pixels_and_repeats_the_end_slices():
    z, y, x = np.mgrid[0:4, 0:40, 0:40].astype(np.float32)
    channels = np.stack([x, 100 * z])  # (C=2, S=4, H, W): column index, slice index
    p = probe_roi.patch(channels, 0, 20.0, 20.0, spacing=2.0, size=8, context=1)
    assert p.shape == (2 * 3, 8, 8) and p.dtype == np.float32
    np.testing.assert_allclose(p[0, 0], 20.0 + (np.arange(8) - 3.5) / 2.0)  # 1 mm = half a 2 mm pixel
    assert [float(p[c, 4, 4]) for c in (3, 4, 5)] == [0.0, 0.0, 100.0]  # slices -1 -> 0, 0, 1
    assert probe_roi.patch(channels, 0, 0.0, 0.0, 1.0, 4, 0)[0, 0, 0] == 0.0  # outside the volume: 0


def test_roi_loss_reads_margin_and_kinetics_only_where_a_lesion_is():
    logits = torch.zeros(2, 3, requires_grad=True)
    y = torch.tensor([[1, 1, 0], [0, 0, 0]])
    probe_roi.loss_fn(logits, y).backward()
    assert logits.grad[1, 1:].abs().sum() == 0 and logits.grad[0].abs().min() > 0


def test_roi_probe_mines_the_components_the_opinion_reads(tiny_bundle, monkeypatch):
    from umlcore.predictor import Predictor
    from umlcore.reader import LesionReader, ReaderConfig

    card = dataclasses.replace(tiny_bundle.card, reader=ReaderConfig(segmentation_min_lesion=0.75))
    bundle = dataclasses.replace(tiny_bundle, card=card, reader=LesionReader(9))
    seen = []

    class Spy(Predictor):
        def __init__(self, b, **kwargs):
            seen.append(b.card.reader.segmentation_min_lesion)
            super().__init__(b, **kwargs)

    monkeypatch.setattr(probe_roi, "Predictor", Spy)
    seed, *_, labels = next(probe_roi.predicted_cases(bundle, range(1_000_000, 1_000_001), (6, 32, 32)))
    assert seed == 1_000_000 and labels.shape == (6, 32, 32)
    assert seen == [None]  # the reader's check of the written labelmap is left out: it would hide the false lesions
    assert bundle.card.reader.segmentation_min_lesion == 0.75  # the caller's bundle is not modified


def test_roi_probe_trains_and_reports_end_to_end(tiny_bundle_dir, tmp_path, capsys):
    args = ["--model", str(tiny_bundle_dir), "--out", str(tmp_path), "--train-cases", "20", "--val-cases", "20",
            "--test-cases", "20", "--shape", "6", "48", "48", "--size", "24", "--crop", "16", "--steps", "2",
            "--batch", "4", "--workers", "1"]
    assert probe_roi.main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) >= {"val", "true", "pred"} and report["train_patches"] >= 20
    assert set(report["pred"]) >= {"label_auc_roi", "label_auc_bundle", "label_auc_mean"}
    assert not (tmp_path / "partial.npz").exists() and (tmp_path / "roinet.safetensors").is_file()
    again = tmp_path / "again"
    again.mkdir()
    for f in tmp_path.glob("*.npz"):
        if not f.name.startswith("train-"):
            (again / f.name).symlink_to(f)
    assert probe_roi.main(args[:3] + [str(again)] + args[4:] + ["--weights", str(tmp_path / "roinet.safetensors")]) == 0
    retested = json.loads((again / "report.json").read_text())
    assert retested == {k: v for k, v in report.items() if k != "train_patches"}  # same weights, same cached cases
    assert not (again / "roinet.safetensors").exists()
    assert not list(again.glob("train-*"))  # testing saved weights builds no training patches
    for bad, why in ((tmp_path / "missing.safetensors", "no such file"), (tmp_path / "roinet.safetensors", "--context 2")):
        with pytest.raises(SystemExit):
            probe_roi.main(args[:3] + [str(again)] + args[4:] + ["--weights", str(bad), "--context", "2"])
        assert why in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probe_roi.main(args[:4] + ["--train-cases", "5"])


def test_add_reader_puts_a_reader_in_a_bundle_then_its_refitted_calibration(tiny_bundle_dir, tmp_path, capsys):
    from safetensors.torch import save_file
    from umlcore.reader import LesionReader

    torch.manual_seed(0)
    reader = LesionReader(9)
    save_file(reader.state_dict(), str(tmp_path / "roinet.safetensors"))
    (tmp_path / "probe.json").write_text(json.dumps({"val": {"spiculated": 0.86}, "train_patches": 1831, "other": 1}))
    step1 = tmp_path / "step1"
    assert add_reader.main(["--model", str(tiny_bundle_dir), "--reader", str(tmp_path / "roinet.safetensors"),
                            "--reader-report", str(tmp_path / "probe.json"), "--weight", "0.4", "--version", "2.0.0",
                            "--out", str(step1)]) == 0
    b = load_bundle(step1)
    assert b.card.version == "2.0.0" and b.card.reader.weight == 0.4 and add_reader.READER_SENTENCE in b.card.description
    assert b.card.reader.training["val"] == {"spiculated": 0.86} and b.card.reader.training["train_patches"] == 1831
    assert "other" not in b.card.reader.training and b.card.reader.training["command"].startswith("python training/probe_roi.py")
    for k, v in reader.state_dict().items():
        assert torch.equal(b.reader.state_dict()[k], v)
    original = load_bundle(tiny_bundle_dir)
    for k, v in original.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v)

    report = {"model": {"sha256": b.sha256}, "command": "python training/evaluate.py ...", "dataset": "4 cases",
              "summary": {"auc": 0.9, "case_calibration": {"slope": 0.7, "intercept": -0.2, "fitted_on": "x"},
                          "component_max_uncertainty": None}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    step2 = tmp_path / "step2"
    assert add_reader.main(["--model", str(step1), "--report", str(tmp_path / "report.json"), "--out", str(step2)]) == 0
    c = load_bundle(step2).card
    assert c.case_calibration == {"slope": 0.7, "intercept": -0.2, "fitted_on": "x"} and c.reader == b.card.reader
    assert c.metrics == {"test_set": "4 cases", "command": "python training/evaluate.py ...", "auc": 0.9}
    assert c.version == "2.0.0"

    # the reader's check of the segmentation: a card-only step; a report measured without it does not fit the card
    step3 = tmp_path / "step3"
    assert add_reader.main(["--model", str(step2), "--segmentation-min-lesion", "0.6", "--version", "2.1.0",
                            "--out", str(step3)]) == 0
    c3 = load_bundle(step3)
    assert (c3.card.reader.segmentation_min_lesion, c3.card.reader.segmentation_max_components) == (0.6, 8)
    assert c3.card.case_calibration == c.case_calibration and c3.card.version == "2.1.0"
    assert c3.card.description.count(add_reader.CHECK_SENTENCE) == 1 and c3.card.reader.opinion_reads == "filtered"
    assert add_reader.main(["--model", str(step2), "--segmentation-min-lesion", "0.6", "--opinion-reads", "checked",
                            "--out", str(tmp_path / "step3b")]) == 0
    assert load_bundle(tmp_path / "step3b").card.reader.opinion_reads == "checked"
    measured = {**report, "model": {"sha256": c3.sha256},
                "summary": {**report["summary"], "segmentation_min_lesion": None}}
    (tmp_path / "measured.json").write_text(json.dumps(measured))

    (tmp_path / "other.json").write_text(json.dumps({**report, "model": {"sha256": "0" * 64}}))
    for argv, why in (
        (["--model", str(step1), "--out", str(tmp_path / "x")], "give --reader"),
        (["--model", str(step1), "--report", str(tmp_path / "report.json"), "--out", str(step2)], "add --overwrite"),
        (["--model", str(step1), "--report", str(tmp_path / "other.json"), "--out", str(tmp_path / "y")], "evaluated another bundle"),
        (["--model", str(tiny_bundle_dir), "--report", str(tmp_path / "report.json"), "--out", str(tmp_path / "y")], "has no reader"),
        (["--model", str(tiny_bundle_dir), "--reader", str(tmp_path / "probe.json"), "--out", str(tmp_path / "y")], "does not fit"),
        (["--model", str(tiny_bundle_dir), "--reader", str(tmp_path / "none"), "--out", str(tmp_path / "y")], "no such file"),
        (["--model", str(step3), "--report", str(tmp_path / "measured.json"), "--out", str(tmp_path / "y")],
         "measured with segmentation_min_lesion None"),
        (["--model", str(step2), "--segmentation-min-lesion", "1.5", "--out", str(tmp_path / "y")],
         "segmentation_min_lesion must be null or a probability"),
        (["--model", str(tiny_bundle_dir), "--segmentation-min-lesion", "0.6", "--out", str(tmp_path / "y")], "has no reader"),
        (["--model", str(step2), "--opinion-reads", "checked", "--out", str(tmp_path / "y")], "add --segmentation-min-lesion"),
    ):
        with pytest.raises(SystemExit):
            add_reader.main(argv)
        assert why in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()



def test_reader_merged_alphas_reproduce_the_predictors_fusion():
    from umlcore.fusion import fuse_reader_opinion

    rows = [{"network_positive_probability": 0.3, "uncertainty": 0.2, "reader_score": 0.9},
            {"network_positive_probability": 0.6, "uncertainty": 0.5, "reader_score": None}]
    np.testing.assert_allclose(evaluate.reader_merged_alphas(rows, 0.0), [[7.0, 3.0], [1.6, 2.4]])
    merged = evaluate.reader_merged_alphas(rows, 0.4)
    np.testing.assert_allclose(merged[0], fuse_reader_opinion(np.array([7.0, 3.0]), 0.9, 0.4))
    np.testing.assert_allclose(merged[0], [1 + 0.6 * 6 + 0.4 * 8 * 0.1, 1 + 0.6 * 2 + 0.4 * 8 * 0.9])
    np.testing.assert_allclose(merged[1], [1.6, 2.4])  # nothing read: the network's opinion stands
    np.testing.assert_allclose(evaluate.reader_merged_alphas(rows, 1.0, positive=0)[0], [1 + 8 * 0.9, 1 + 8 * 0.1])
    logit = evaluate.reader_merged_alphas(rows, 1.0, fusion="logit")  # odds 3/7 * 9 = 27/7: p = 27/34
    np.testing.assert_allclose(logit, [[10 * 7 / 34, 10 * 27 / 34], [1.6, 2.4]])
    # "evidence" rows: the final uncertainty is the fused one; the network's (u = 0.2, S = 10) is its own field
    ev = [{**rows[0], "uncertainty": 0.05, "network_uncertainty": 0.2}, {**rows[1], "network_uncertainty": None}]
    np.testing.assert_allclose(evaluate.network_strengths(ev), [10.0, 4.0])
    np.testing.assert_allclose(evaluate.reader_merged_alphas(ev, 2.0, fusion="evidence")[0],
                               fuse_reader_opinion(np.array([7.0, 3.0]), 0.9, 2.0, mode="evidence"))
    final = evaluate.calibrated_alphas(np.array([[1.0, 243 / 7]]), ev[:1], 1.0, 0.0, 1, "evidence")
    np.testing.assert_allclose(final, [[1.0, 243 / 7]])  # identity calibration: the fused opinion stands
    # "stacked": every row through stack_reader_opinion, with the read lesion's probabilities or None
    from umlcore.fusion import STACKING_TERMS, stack_reader_opinion
    coefficients = {**dict.fromkeys(STACKING_TERMS, 0.3), "intercept": -0.2}
    st = [{**ev[0], "reader_probabilities": [0.9, 0.7, 0.2]}, {**ev[1], "reader_probabilities": None}]
    stacked = evaluate.reader_merged_alphas(st, 1.0, fusion="stacked", stacking=coefficients)
    np.testing.assert_allclose(stacked[0], stack_reader_opinion(np.array([7.0, 3.0]), np.array([0.9, 0.7, 0.2]),
                                                                coefficients))
    np.testing.assert_allclose(stacked[1], stack_reader_opinion(np.array([1.6, 2.4]), None, coefficients))
    with pytest.raises(ValueError, match="rescore them with rescore_reader.py"):
        evaluate.reader_merged_alphas([ev[0]], 1.0, fusion="stacked", stacking=coefficients)


def test_choose_reader_weight_follows_the_informative_opinion():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    good = np.where(labels == 1, 0.8, 0.2) + rng.normal(0, 0.15, 300)  # separates the labels
    noise = rng.random(300)  # does not
    def rows(network, reader):
        return [{"network_positive_probability": float(np.clip(n, 0.15, 0.85)), "uncertainty": 0.1,
                 "reader_score": float(np.clip(r, 0, 1)), "label": int(y)} for n, r, y in zip(network, reader, labels)]
    fusion, w, table = evaluate.choose_reader_weight(rows(noise, good))
    assert fusion == "average" and w >= 0.8 and set(table) == {"average"}
    assert set(table["average"]) == set(map(str, evaluate.READER_WEIGHTS["average"]))
    assert table["average"]["1.0"]["auc"] > 0.9 > 0.6 > table["average"]["0.0"]["auc"]
    fusion, w, table = evaluate.choose_reader_weight(rows(good, noise), fusions=("average", "logit"))
    assert w <= 0.2 and set(table) == {"average", "logit"}
    assert table[fusion][str(w)]["nll"] == min(v["nll"] for t in table.values() for v in t.values())
    # two independent calibrated opinions (x ~ N(+-1, 1) gives log-odds 2x; x ~ N(+-2, 1) gives 4x): the true
    # posterior log-odds are their sum, which log-odds pooling with weight 1 reproduces and averaging cannot
    sign = 2 * labels - 1
    net, read = 2 * (sign + rng.normal(0, 1, 300)), 4 * (2 * sign + rng.normal(0, 1, 300))
    both = [{"network_positive_probability": float(1 / (1 + np.exp(-a))), "uncertainty": 0.01,
             "reader_score": float(1 / (1 + np.exp(-b))), "label": int(y)} for a, b, y in zip(net, read, labels)]
    fusion, w, table = evaluate.choose_reader_weight(both, fusions=("average", "logit"))
    assert fusion == "logit" and 0.7 <= w <= 1.3
    assert table["logit"][str(w)]["nll"] < min(v["nll"] for v in table["average"].values())


def test_choose_reader_weight_keeps_to_the_calibration_target(monkeypatch):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    rows = [{"network_positive_probability": float(np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.2), 0.1, 0.9)),
             "uncertainty": 0.2, "reader_score": float(np.clip(0.5 + 0.6 * (y - 0.5) + rng.normal(0, 0.3), 0, 1)),
             "label": int(y)} for y in labels]
    _, _, table = evaluate.choose_reader_weight(rows, fusions=("evidence",))
    eces = sorted(v["ece"] for v in table["evidence"].values())
    limit = eces[len(eces) // 2]  # half the weights meet this target
    monkeypatch.setattr(evaluate, "READER_WEIGHT_ECE_MAX", limit)
    _, w, _ = evaluate.choose_reader_weight(rows, fusions=("evidence",))
    eligible = {k: v["nll"] for k, v in table["evidence"].items() if v["ece"] <= limit}
    assert str(w) == min(eligible, key=eligible.get)
    monkeypatch.setattr(evaluate, "READER_WEIGHT_ECE_MAX", -1.0)  # none meets it: the lowest NLL of all
    _, w, _ = evaluate.choose_reader_weight(rows, fusions=("evidence",))
    assert table["evidence"][str(w)]["nll"] == min(v["nll"] for v in table["evidence"].values())


def test_evaluate_fits_the_reader_weight_and_add_reader_writes_it(tiny_bundle_dir, tmp_path, capsys):
    from safetensors.torch import save_file
    from umlcore.reader import LesionReader

    torch.manual_seed(0)
    save_file(LesionReader(9).state_dict(), str(tmp_path / "roinet.safetensors"))
    with_reader = tmp_path / "with-reader"
    assert add_reader.main(["--model", str(tiny_bundle_dir), "--reader", str(tmp_path / "roinet.safetensors"),
                            "--out", str(with_reader)]) == 0
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(with_reader), "--out", str(out), "--cases", "2", "--shape", "6", "32", "32",
                          "--robustness-cases", "1", "--mode-cases", "1", "--label-noise", "0.0",
                          "--calibrate-cases", "2", "--component-filter", "bundle", "--reader-weight", "fit",
                          "--reader-fusion", "fit", "--test-time-augmentation", "flip_w",
                          "--motion-correction", "early"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["motion_correction"] == {"mode": "translation", "reference": "early", "max_shift_mm": 10.0}
    assert all(isinstance(r["motion_shift_mm"], float) for r in report["cases"])  # three phases: aligned
    fit = report["summary"]["reader_weight"]
    assert fit["weight"] in evaluate.READER_WEIGHTS[fit["fusion"]] and fit["fitted_on"].startswith("2 validation cases")
    assert {f: set(t) for f, t in fit["validation"].items()} == {f: set(map(str, w))
                                                                  for f, w in evaluate.READER_WEIGHTS.items()}
    assert report["validation_cases_reader"] == {"fusion": "average", "weight": 0.5}  # the bundle's, before the fit
    final = tmp_path / "final"
    assert add_reader.main(["--model", str(with_reader), "--report", str(out / "report.json"), "--out", str(final)]) == 0
    card = load_bundle(final).card
    assert card.reader.weight == fit["weight"] and card.reader.fusion == fit["fusion"]
    assert card.reader.training["weight_fit"]["validation"] == fit["validation"]
    assert "reader_weight" not in card.metrics
    assert card.test_time_augmentation == "flip_w" and "test_time_augmentation" not in card.metrics  # the report's rules
    assert card.input.motion_correction == MotionCorrection("translation", "early") and "motion_correction" not in card.metrics
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(with_reader), "--out", str(tmp_path / "bad"), "--motion-correction", "arterial"])
    assert "--motion-correction arterial: give 'bundle', 'none' or one of" in capsys.readouterr().err
    for argv, why in ((["--calibrate-cases", "0"], "add --calibrate-cases"), (["--calibrate-cases", "2"], "has no lesion reader")):
        model = with_reader if why.startswith("add") else tiny_bundle_dir
        with pytest.raises(SystemExit):
            evaluate.main(["--model", str(model), "--out", str(tmp_path / "bad"), "--reader-weight", "fit", *argv])
        assert why in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(with_reader), "--out", str(tmp_path / "bad"), "--reader-fusion", "logit"])
    assert "add --reader-weight fit" in capsys.readouterr().err
    def refit_from_first_report(dest, fusion):  # the first report's validation rows, tested on later seeds
        return evaluate.main(["--model", str(with_reader), "--out", str(dest), "--cases", "1", "--shape", "6", "32",
                              "32", "--robustness-cases", "1", "--mode-cases", "1", "--label-noise", "0.0",
                              "--calibrate-cases", "2", "--component-filter", "bundle", "--reader-weight", "fit",
                              "--reader-fusion", fusion, "--validation-from", str(out / "report.json"),
                              "--test-seeds-from", str(evaluate.TEST_SEED_BASE + 5), "--test-time-augmentation", "flip_w",
                              "--motion-correction", "early"])

    again = tmp_path / "again"
    assert refit_from_first_report(again, "fit") == 0
    second = json.loads((again / "report.json").read_text())
    assert second["validation_cases"] == report["validation_cases"] and second["summary"]["reader_weight"] == fit
    assert second["summary"]["case_calibration"] == report["summary"]["case_calibration"]
    assert [c["seed"] for c in second["cases"]] == [evaluate.TEST_SEED_BASE + 5]
    assert second["validation_cases_from"] == str(out / "report.json")
    common = ["--out", str(tmp_path / "bad"), "--cases", "1", "--shape", "6", "32", "32", "--label-noise", "0.0",
              "--component-filter", "bundle", "--validation-from", str(out / "report.json")]
    other = tmp_path / "other-weight"  # the same weights, another reader weight
    assert add_reader.main(["--model", str(tiny_bundle_dir), "--reader", str(tmp_path / "roinet.safetensors"),
                            "--weight", "0.3", "--out", str(other)]) == 0
    for argv, why in (([str(other), "--calibrate-cases", "2"], "fused with reader"),
                      ([str(with_reader), "--calibrate-cases", "3"], "lacks validation rows"),
                      ([str(with_reader), "--calibrate-cases", "2"], "read its cases with test_time_augmentation 'flip_w'"),
                      ([str(with_reader), "--calibrate-cases", "2", "--test-time-augmentation", "flip_w"],
                       "its cases were read with motion_correction {'mode': 'translation'"),
                      ([str(tiny_bundle_dir), "--calibrate-cases", "2"], "other weights"),
                      ([str(with_reader), "--calibrate-cases", "2", "--test-seeds-from", "5"], "test seeds start"),
                      ([str(with_reader), "--calibrate-cases", "2", "--shape", "6", "32", "40"], "not of shape")):
        with pytest.raises(SystemExit):
            evaluate.main(["--model", argv[0], *common, *argv[1:]])  # argv's options win over common's
        assert why in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # the rule "evidence" (the reader may lower the case uncertainty); the review threshold stays the card's
    ev = tmp_path / "ev"
    assert refit_from_first_report(ev, "evidence") == 0
    third = json.loads((ev / "report.json").read_text())["summary"]
    assert third["reader_weight"]["fusion"] == "evidence" and set(third["reader_weight"]["validation"]) == {"evidence"}
    assert add_reader.main(["--model", str(with_reader), "--report", str(ev / "report.json"),
                            "--out", str(tmp_path / "final-ev")]) == 0
    card = load_bundle(tmp_path / "final-ev").card
    assert card.reader.fusion == "evidence" and card.review_uncertainty == load_bundle(with_reader).card.review_uncertainty
    assert "review_uncertainty stays" in capsys.readouterr().out
    # its rows carry the network's own uncertainty, from which the next fit rebuilds the fused opinions
    assert evaluate.main(["--model", str(tmp_path / "final-ev"), "--out", str(tmp_path / "ev2"), "--cases", "1",
                          "--shape", "6", "32", "32", "--robustness-cases", "1", "--mode-cases", "1",
                          "--label-noise", "0.0", "--calibrate-cases", "2", "--component-filter", "bundle",
                          "--reader-weight", "fit", "--reader-fusion", "evidence"]) == 0
    rows = json.loads((tmp_path / "ev2" / "report.json").read_text())["validation_cases"]
    assert all(0 < r["network_uncertainty"] <= 1 for r in rows)


def test_roi_augment_noise_reaches_noise_max_for_half_the_patches():
    gen = torch.Generator().manual_seed(0)
    zeros = torch.zeros(400, 3, 12, 12)  # gamma and intensity jitter leave zeros at zero: only the noise remains
    plain = probe_roi.augment(zeros, 8, 3, gen).flatten(1).std(dim=1)
    noisy = probe_roi.augment(zeros, 8, 3, gen, noise_max=0.5).flatten(1).std(dim=1)
    assert plain.max() < 0.04 and noisy.max() > 0.4
    assert 0.35 < (noisy < 0.04).float().mean() < 0.65  # about half keep the clean range (0.03: 0.5 + 0.5 * 0.06)


def test_roi_probe_without_a_test_only_trains(tiny_bundle_dir, tmp_path, capsys):
    args = ["--model", str(tiny_bundle_dir), "--out", str(tmp_path), "--train-cases", "20", "--val-cases", "20",
            "--test-cases", "0", "--shape", "6", "48", "48", "--size", "24", "--crop", "16", "--steps", "2",
            "--batch", "4", "--workers", "1", "--noise-max", "0.2"]
    assert probe_roi.main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["noise_max"] == 0.2 and report["steps"] == 2 and "test_cases" not in report and "pred" not in report
    assert (tmp_path / "roinet.safetensors").is_file() and not list(tmp_path.glob("test-*"))
    for bad, why in ((["--test-cases", "5"], "--test-cases 0"), (["--noise-max", "2"], "--noise-max must lie")):
        with pytest.raises(SystemExit):
            probe_roi.main(args + bad)
        assert why in capsys.readouterr().err


def _two_reader_bundles(base: Path, folder: Path, tta1: str = "none") -> dict[int, Path]:
    """Bundles of ``base``'s network with two untrained readers (torch seeds 0 and 1; the second reads with the
    test-time augmentation ``tta1``)."""
    from safetensors.torch import save_file
    from umlcore.reader import LesionReader

    readers = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_file(LesionReader(9).state_dict(), str(folder / f"roinet{seed}.safetensors"))
        readers[seed] = folder / f"reader{seed}"
        assert add_reader.main(["--model", str(base), "--reader", str(folder / f"roinet{seed}.safetensors"),
                                "--out", str(readers[seed]), *(["--test-time-augmentation", tta1] if seed else [])]) == 0
    return readers


def test_evaluate_compares_another_reader_on_the_same_cases(tiny_bundle_dir, tmp_path, capsys, monkeypatch):
    import umlcore.predictor

    # the untrained network segments nothing: let the readers read one component at the centre of every case
    monkeypatch.setattr(umlcore.predictor, "component_centres", lambda labels, n: [(10, 3, 16, 16)])

    readers = _two_reader_bundles(tiny_bundle_dir, tmp_path)
    common = ["--cases", "3", "--shape", "6", "32", "32", "--robustness-cases", "1", "--mode-cases", "1",
              "--label-noise", "0.0"]
    # compared with itself, the recomputed opinion is the predictor's, case by case
    assert evaluate.main(["--model", str(readers[0]), "--out", str(tmp_path / "self"), *common,
                          "--compare-model", str(readers[0])]) == 0
    report = json.loads((tmp_path / "self" / "report.json").read_text())
    assert [r["compare_reader_score"] for r in report["cases"]] == [r["reader_score"] for r in report["cases"]]
    assert all(r["reader_score"] is not None for r in report["cases"])
    s = report["summary"]
    for k in ("auc", "accuracy", "ece", "brier", "nll", "eaurc"):
        assert s["compare"][k] == pytest.approx(s[k], abs=1e-9), k
    for r in report["cases"]:
        assert r["compare_positive_probability"] == pytest.approx(r["positive_probability"], abs=1e-9)
    assert s["compare"]["model"]["sha256"] == load_bundle(readers[0]).sha256
    assert "Compared on the same cases" in (tmp_path / "self" / "report.md").read_text()
    # the same with the rule "evidence" and a case calibration (the calibrated strength has a least value)
    b = load_bundle(readers[1])
    card = dataclasses.replace(b.card, reader=dataclasses.replace(b.card.reader, fusion="evidence", weight=2.0),
                               case_calibration={"slope": 0.7, "intercept": -0.3, "fitted_on": "a test"})
    save_bundle(b.model, card, tmp_path / "evidence", reader=b.reader)
    assert evaluate.main(["--model", str(tmp_path / "evidence"), "--out", str(tmp_path / "self-ev"), *common,
                          "--compare-model", str(tmp_path / "evidence")]) == 0
    ev = json.loads((tmp_path / "self-ev" / "report.json").read_text())
    for r in ev["cases"]:
        assert r["compare_positive_probability"] == pytest.approx(r["positive_probability"], abs=1e-9)
    for k in ("auc", "ece", "nll", "eaurc"):
        assert ev["summary"]["compare"][k] == pytest.approx(ev["summary"][k], abs=1e-9), k
    # another reader reads the same lesions: other scores, the same network opinion
    assert evaluate.main(["--model", str(readers[0]), "--out", str(tmp_path / "other"), *common,
                          "--compare-model", str(readers[1])]) == 0
    rows = json.loads((tmp_path / "other" / "report.json").read_text())["cases"]
    assert [r["network_positive_probability"] for r in rows] == [r["network_positive_probability"] for r in report["cases"]]
    assert [r["reader_score"] for r in rows] == [r["reader_score"] for r in report["cases"]]
    assert all(r["compare_reader_score"] != r["reader_score"] for r in rows)
    for model, other, extra, why in ((readers[0], tiny_bundle_dir, [], "it has no lesion reader"),
                                     (tiny_bundle_dir, readers[0], [], "the evaluated model has no lesion reader"),
                                     (readers[0], readers[1], ["--calibrate-cases", "2"], "add --component-filter bundle")):
        with pytest.raises(SystemExit):
            evaluate.main(["--model", str(model), "--out", str(tmp_path / "bad"), *common,
                           "--compare-model", str(other), *extra])
        assert why in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    a = load_bundle(readers[0])
    assert evaluate.check_comparable(a, b) == []
    changed = copy.deepcopy(b.model)
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    assert evaluate.check_comparable(a, dataclasses.replace(b, model=changed)) == ["its network weights differ"]


def _free_corner(case) -> bool:
    """No lesion in or next to the corner blob of :class:`_HardStandIn`."""
    return not case.mask[:3, :5, :5].any()


class _HardStandIn:
    """A predictor for 6 x 48 x 48 synthetic cases that segments every true lesion and a false 2 x 4 x 4 blob in a
    lesion-free corner (the untrained test bundle segments nothing)."""

    def __init__(self, bundle, **kw):
        pass

    def predict(self, images, case_id):
        from umlcore.predictor import Prediction
        from umlcore.synthetic import generate_case

        case = generate_case(int(case_id.split("-")[1]), shape=(6, 48, 48), label_noise=0.02)
        lab = case.mask.astype(np.uint8)
        if _free_corner(case):
            lab[:2, :4, :4] = 1
        image = sitk.GetImageFromArray(lab)
        image.CopyInformation(images[0])
        return Prediction(labelmap=image, uncertainty=image, probability=None, summary={})


def test_hard_patches_are_the_predicted_lesions_negative_where_they_miss_the_truth(tiny_bundle, monkeypatch):
    from umlcore.predictor import label_components
    from umlcore.synthetic import generate_case

    shape = (6, 48, 48)
    free_corner = _free_corner
    monkeypatch.setattr(probe_roi, "Predictor", _HardStandIn)
    seeds = range(8)
    data = probe_roi.predicted_patches(tiny_bundle, seeds, shape, 24, 1, 10, lambda msg: None)
    assert data["x"].shape[1:] == (9, 24, 24) and len(data["x"]) == len(data["y"]) == len(data["seed"])
    for s in seeds:
        case = generate_case(s, shape=shape, label_noise=0.02)
        y, voxels = data["y"][data["seed"] == s], data["voxels"][data["seed"] == s]
        lesion_components = len(label_components(case.mask, np.zeros(shape))[1]) - 1
        assert int((y[:, 0] == 1).sum()) == lesion_components
        assert (y[y[:, 0] == 1, 1:] == probe_roi.phenotype(case)).all()
        assert (y[y[:, 0] == 0] == 0).all() and int((y[:, 0] == 0).sum()) == int(free_corner(case))
        assert (voxels[y[:, 0] == 0] == 32).all()
    assert (data["y"][:, 0] == 0).any() and (data["y"][:, 0] == 1).any()
    assert len(probe_roi.predicted_patches(tiny_bundle, range(0), shape, 24, 1, 3, print)["x"]) == 0


def test_roi_probe_adds_hard_patches_to_the_training_set(tiny_bundle_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(probe_roi, "Predictor", _HardStandIn)
    real_predicted_patches = probe_roi.predicted_patches
    args = ["--model", str(tiny_bundle_dir), "--out", str(tmp_path), "--train-cases", "20", "--val-cases", "20",
            "--test-cases", "0", "--shape", "6", "48", "48", "--size", "24", "--crop", "16", "--steps", "2",
            "--batch", "4", "--workers", "1"]
    assert probe_roi.main(args) == 0
    plain = json.loads((tmp_path / "report.json").read_text())["train_patches"]
    assert probe_roi.main(args + ["--hard-cases", "8"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["hard_cases"] == 8 and report["hard_negatives"] > 0
    assert report["train_patches"] == plain + report["hard_patches"]
    assert len(list(tmp_path.glob("hard-8-3-*.npz"))) == 1
    # a larger --hard-cases extends the cached 8 cases by the 4 new ones instead of recomputing them
    predicted = []
    monkeypatch.setattr(probe_roi, "predicted_patches",
                        lambda bundle, seeds, *a: predicted.append(seeds) or real_predicted_patches(bundle, seeds, *a))
    assert probe_roi.main(args + ["--hard-cases", "12"]) == 0
    assert predicted == [range(8, 12)]
    extended = np.load(next(tmp_path.glob("hard-12-3-*.npz")))
    fresh = real_predicted_patches(load_bundle(tiny_bundle_dir), range(12), (6, 48, 48), 24, 1, 3, print)
    assert set(extended.files) == set(fresh) and all(np.array_equal(extended[k], fresh[k]) for k in fresh)
    assert json.loads((tmp_path / "report.json").read_text())["hard_cases"] == 12
    for bad, why in ((["--hard-cases", "21"], "--hard-cases must lie"),
                     (["--hard-cases", "2", "--weights", str(tmp_path / "roinet.safetensors")], "give one of them")):
        with pytest.raises(SystemExit):
            probe_roi.main(args + bad)
        assert why in capsys.readouterr().err


def test_probe_single_volume_reads_every_input_and_restores_the_predictor(tiny_bundle_dir, tmp_path, capsys,
                                                                          monkeypatch):
    import umlcore.predictor

    monkeypatch.setattr(umlcore.predictor, "component_centres", lambda labels, n: [(10, 3, 16, 16)])
    readers = _two_reader_bundles(tiny_bundle_dir, tmp_path)
    out = tmp_path / "probe.json"
    assert probe_single_volume.main(["--model", str(readers[0]), "--cases", "2", "--shape", "6", "32", "32",
                                     "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [r["mode"] for r in got["rows"]] == list(probe_single_volume.INPUTS) * 2
    assert {r["components"] for r in got["rows"]} == {1} and all(len(r["reader_p"]) == 1 for r in got["rows"])
    # one volume: the predictor itself left the reader out, the probe read it anyway (as phases)
    assert [t["input"] for t in got["table"]] == list(probe_single_volume.INPUTS)
    assert "| input | cases |" in capsys.readouterr().out
    bundle = load_bundle(readers[0])
    predictor = umlcore.predictor.Predictor(bundle, device="cpu")
    rows = probe_single_volume.probe_case(predictor, 1_200_000, (6, 32, 32), ("early",))
    assert rows[0]["seed"] == 1_200_000 and predictor._read_lesions.__func__ is umlcore.predictor.Predictor._read_lesions
    with pytest.raises(SystemExit):
        probe_single_volume.main(["--model", str(tiny_bundle_dir), "--cases", "1"])
    assert "has no lesion reader" in capsys.readouterr().err


def test_kept_patches_are_the_patches_themselves_not_their_eight_views(tiny_bundle_dir, tmp_path, monkeypatch,
                                                                       make_volume):
    import rescore_reader
    import umlcore.predictor
    from umlcore.reader import READER_TARGETS, dihedral_views, read_patches

    monkeypatch.setattr(umlcore.predictor, "component_centres", lambda labels, n: [(10, 3, 16, 16), (4, 1, 8, 20)])
    readers = _two_reader_bundles(tiny_bundle_dir, tmp_path, tta1="dihedral")
    predictor = umlcore.predictor.Predictor(load_bundle(readers[1]), device="cpu")
    with evaluate.reader_inputs(predictor) as captured:
        summary = predictor.predict([make_volume(size=(32, 32, 6))] * 3).summary
    (kept,) = captured
    assert kept.shape == (2, 9, 80, 80)  # two components, not their 16 views
    with torch.no_grad():  # what the predictor read: the 8 views of the kept patches
        p = read_patches(predictor.bundle.reader, torch.from_numpy(kept), "dihedral").numpy()
    for lesion, row in zip(summary["lesions"], p):
        assert [lesion["probabilities"][t] for t in READER_TARGETS] == pytest.approx(row.tolist(), abs=1e-6)
    # files written before kept the 8 views: rescoring takes the patches back from them, and leaves others alone
    views = dihedral_views(torch.from_numpy(kept)).numpy()
    np.testing.assert_array_equal(rescore_reader.original_patches(views), kept)
    assert rescore_reader.original_patches(kept) is kept
    shuffled = views[::-1].copy()
    assert rescore_reader.original_patches(shuffled) is shuffled


def test_rescore_reader_reproduces_evaluate_and_scores_another_reader_from_kept_patches(tiny_bundle_dir, tmp_path,
                                                                                        capsys, monkeypatch):
    import rescore_reader
    import umlcore.predictor

    monkeypatch.setattr(umlcore.predictor, "component_centres", lambda labels, n: [(10, 3, 16, 16), (4, 1, 8, 20)])
    readers = _two_reader_bundles(tiny_bundle_dir, tmp_path, tta1="dihedral")  # the second reads 8 views
    assert load_bundle(readers[1]).card.reader.test_time_augmentation == "dihedral"
    run = tmp_path / "run"
    assert evaluate.main(["--model", str(readers[0]), "--out", str(run), "--cases", "3", "--shape", "6", "32", "32",
                          "--robustness-cases", "1", "--mode-cases", "1", "--label-noise", "0.0",
                          "--calibrate-cases", "4", "--component-filter", "bundle", "--reader-weight", "fit",
                          "--reader-fusion", "evidence", "--keep-reader-patches",
                          "--compare-model", str(readers[1])]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["reader_patches"]["cases"] == {"validation": 4, "test": 3}
    with np.load(run / "reader_patches.npz") as kept:
        assert sorted(kept.files) == sorted([f"validation-{1_000_000 + i}" for i in range(4)] +
                                            [f"test-{evaluate.TEST_SEED_BASE + i}" for i in range(3)])
        assert kept[f"test-{evaluate.TEST_SEED_BASE}"].shape == (2, 9, 80, 80)

    # the same reader: the same fit and the same test opinions as evaluate.py
    same = tmp_path / "same"
    assert rescore_reader.main(["--report", str(run / "report.json"), "--model", str(readers[0]), "--out", str(same),
                                "--reader-weight", "fit", "--reader-fusion", "evidence"]) == 0
    again = json.loads((same / "report.json").read_text())
    s, t = report["summary"], again["summary"]
    assert t["reader_weight"]["weight"] == s["reader_weight"]["weight"]
    for k in ("slope", "intercept"):
        assert t["case_calibration"][k] == pytest.approx(s["case_calibration"][k], abs=1e-9)
    for a, b in zip(report["cases"], again["cases"]):
        for k in ("reader_score", "positive_probability", "uncertainty"):
            assert b[k] == pytest.approx(a[k], abs=1e-9), k
    for k in ("auc", "ece", "nll", "brier", "eaurc", "dice_mean", "pixel_uncertainty_error_auroc"):
        assert t[k] == pytest.approx(s[k], abs=1e-9), k
    assert (same / "report.md").is_file() and (same / "reliability.png").is_file()

    # another reader (with test-time augmentation): its scores are those it gave reading the same lesions beside the
    # first (--compare-model), so the predictor and the rescoring read the kept patches the same way
    other = tmp_path / "other"
    assert rescore_reader.main(["--report", str(run / "report.json"), "--model", str(readers[1]), "--out",
                                str(other)]) == 0
    scored = json.loads((other / "report.json").read_text())
    assert scored["model"]["sha256"] == load_bundle(readers[1]).sha256
    for a, b in zip(report["cases"], scored["cases"]):
        assert b["reader_score"] == pytest.approx(a["compare_reader_score"], abs=1e-9)
        assert b["positive_probability"] == pytest.approx(a["compare_positive_probability"], abs=1e-9)
    with pytest.raises(SystemExit):
        add_reader.main(["--model", str(readers[1]), "--report", str(same / "report.json"), "--out", str(tmp_path / "x")])
    assert "evaluated another bundle" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the setting belongs to step 1: a report was measured with the card's
        add_reader.main(["--model", str(readers[1]), "--report", str(other / "report.json"), "--out", str(tmp_path / "x"),
                         "--test-time-augmentation", "dihedral"])
    assert "--test-time-augmentation belongs to step 1" in capsys.readouterr().err

    # refusals: no kept patches, another network, no reader, no validation rows to fit on
    plain = tmp_path / "plain"
    assert evaluate.main(["--model", str(readers[0]), "--out", str(plain), "--cases", "1", "--shape", "6", "32", "32",
                          "--robustness-cases", "1", "--mode-cases", "1", "--label-noise", "0.0"]) == 0
    b = load_bundle(readers[1])
    changed = copy.deepcopy(b.model)
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    save_bundle(changed, b.card, tmp_path / "changed", reader=b.reader)
    for rep, model, extra, why in (
            (plain, readers[1], [], "--keep-reader-patches"),
            (run, tmp_path / "changed", [], "its network is not the one"),
            (run, tiny_bundle_dir, [], "it has no lesion reader"),
            (run, readers[1], ["--reader-fusion", "logit"], "add --reader-weight fit")):
        with pytest.raises(SystemExit):
            rescore_reader.main(["--report", str(rep / "report.json"), "--model", str(model),
                                 "--out", str(tmp_path / "bad"), *extra])
        assert why in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
