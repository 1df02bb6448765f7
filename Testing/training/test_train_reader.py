"""training.train_reader: patches in millimetres, targets, hard cases from the predictor, a run end to end."""

import json

import numpy as np
import pytest
import torch

from training import train_reader
from training.train_reader import ReaderTrainConfig, augment, hard_patches, loss_fn, training_patches
from umlcore.card import Normalization, ReaderConfig
from umlcore.preprocess import slice_axis_index, to_slices
from umlcore.synthetic import generate_case


def test_training_patches_centre_each_true_lesion_with_its_phenotype():
    seed = next(s for s in range(50) if generate_case(s, shape=(6, 48, 48), label_noise=0.02).lesions)
    case = generate_case(seed, shape=(6, 48, 48), label_noise=0.02)
    patches = training_patches((seed, (6, 48, 48), Normalization(), 24, 1))
    assert 1 <= len(patches) <= train_reader.MAX_LESIONS
    for x, y, voxels in patches:
        assert x.shape == (9, 24, 24) and x.dtype == np.float32 and voxels > 0
        assert y[0] == 1 and list(y[1:]) == list(train_reader._targets(case)[1:])
    free = next(s for s in range(50) if not generate_case(s, shape=(6, 48, 48), label_noise=0.02).lesions)
    ((x, y, voxels),) = training_patches((free, (6, 48, 48), Normalization(), 24, 1))
    assert list(y) == [0, 0, 0] and voxels == 0  # a lesion-free case gives one enhancing negative


def test_the_loss_reads_margin_and_kinetics_only_where_a_lesion_is():
    logits = torch.zeros(2, 3, requires_grad=True)
    loss_fn(logits, torch.tensor([[1, 1, 0], [0, 0, 0]])).backward()
    assert logits.grad[1, 1:].abs().sum() == 0 and logits.grad[0].abs().min() > 0


def test_augment_noise_reaches_noise_max_for_half_the_patches():
    x = torch.full((400, 3, 24, 24), 0.5)
    out = augment(x, 16, torch.Generator().manual_seed(0), noise_max=0.3)
    sigma = out.std(dim=(1, 2, 3))
    assert out.shape == (400, 3, 16, 16)
    assert 0.35 < float((sigma > 0.035).float().mean()) < 0.5  # about half draw up to 0.3, the rest up to 0.03


def test_hard_patches_are_the_predictors_components_negative_where_they_miss(tiny_bundle, box_segmentation):
    cfg = ReaderTrainConfig(shape=(6, 48, 48), size=24, components=3)
    bundle = box_segmentation(tiny_bundle)  # every case: one component, the fixed box
    rows = hard_patches(bundle, range(0, 6), cfg, print)
    for seed, x, y, voxels in rows:
        assert x.shape == (9, 24, 24) and voxels == 6 * 10 * 12
        case = generate_case(seed, shape=(6, 48, 48), label_noise=0.02)
        truth = to_slices(case.mask, slice_axis_index(case.direction, "axial"))
        # the box lies in every slice, rows 10-19, columns 20-31 of the slice order: a negative where it misses every
        # lesion, a lesion patch where at least half of it is lesion (one that touches less is left out)
        assert y[0] == int(bool(truth[:, 10:20, 20:32].any()))
    assert any(y[0] == 0 for _, _, y, _ in rows) and len(rows) >= 4


def test_a_run_writes_the_readers_weights_and_card_section(tiny_bundle_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_bundle_dir), "--out", str(tmp_path), "--train-cases", "20", "--val-cases", "20",
            "--hard-cases", "2", "--shape", "6", "48", "48", "--size", "24", "--crop", "16", "--steps", "20",
            "--batch", "4", "--workers", "1"]
    assert train_reader.main(argv) == 0
    section = json.loads((tmp_path / "reader.json").read_text())
    config = ReaderConfig(**section)
    assert (config.patch_size, config.context_slices, config.stacking) == (16, 1, None)
    record = config.training
    assert record["command"].startswith("python -m training.train_reader --model") and record["hard_cases"] == 2
    assert record["train_patches"] >= 20 and set(record["val"]) == {"lesion", "spiculated", "washout"}
    assert (tmp_path / "reader.safetensors").is_file() and "validation AUCs" in (tmp_path / "log.txt").read_text()
    assert json.loads((tmp_path / "train_config.json").read_text())["steps"] == 20
    cached = sorted(p.name for p in tmp_path.glob("*.npz"))
    assert len(cached) == 3 and cached[0].startswith("hard-2-3-")  # a second run reuses the patches
    with pytest.raises(SystemExit) as exc:
        train_reader.main([*argv, "--steps", "5"])
    assert exc.value.code == 2 and "--steps must be at least 20" in capsys.readouterr().err
