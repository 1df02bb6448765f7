"""training.data: --data, splits, what a dataset is (for the card), cases prepared as the predictor prepares them."""

import json

import numpy as np
import pytest

from training.data import (DataSpec, DatasetInfo, Preparation, SYNTHETIC_INFO, check_labels, describe, prepare_case,
                           resolve_split)
from training.datasets import Case, write_split
from umlcore.card import Normalization
from umlcore.errors import UMLInputError
from umlcore.preprocess import normalize

from .layouts import write_folder_pictures, write_folder_volumes, write_isic2017, write_ispy1, write_refuge


def test_data_spec_parses_every_kind_and_refuses_the_rest():
    assert DataSpec.parse("synthetic") == DataSpec("synthetic", "")
    assert DataSpec.parse("refuge:/data/REFUGE") == DataSpec("refuge", "/data/REFUGE")
    assert str(DataSpec.parse("folder:C:/data")) == "folder:C:/data"  # only the first colon separates
    for bad in ("mnist:/x", "refuge", "refuge:", "synthetic:/x", ""):
        with pytest.raises(UMLInputError, match="--data must be 'synthetic' or KIND:PATH"):
            DataSpec.parse(bad)


@pytest.mark.parametrize("kind, writer, picture, channels, classes, segments", [
    ("ispy1", write_ispy1, False, ("DCEMRI_1",), ("no pCR", "pCR"), ("Tumour",)),
    ("refuge", write_refuge, True, ("red", "green", "blue"), ("non-glaucoma", "glaucoma"),
     ("Optic disc rim", "Optic cup")),
    ("isic2017", write_isic2017, True, ("red", "green", "blue"), ("not melanoma", "melanoma"), ("Lesion",)),
    ("folder", write_folder_pictures, True, ("red", "green", "blue"), ("0", "1"), ("Segment 1", "Segment 2")),
    ("folder", write_folder_volumes, False, ("channel1", "channel2", "channel3"), ("0", "1"), ("Segment 1",)),
])
def test_each_kind_is_split_once_and_described_for_the_card(tmp_path, kind, writer, picture, channels, classes,
                                                            segments):
    spec = DataSpec(kind, str(writer(tmp_path / "data")))
    out = tmp_path / "run"
    out.mkdir()
    split = resolve_split(spec, "", (0.5, 0.25, 0.25), 0, out)
    assert sorted(c for part in split.values() for c in part) == sorted(
        json.loads((out / "split.json").read_text())["train"] + split["val"] + split["test"])
    assert split["train"] and split["val"] and not set(split["train"]) & set(split["test"])
    info = describe(spec, split, out / "split.json")
    assert (info.input_kind == "picture") == picture
    assert (info.channels, info.classes, tuple(s.name for s in info.segments)) == (channels, classes, segments)
    assert [s.label for s in info.segments] == list(range(1, len(segments) + 1))
    assert len(info.split_sha256) == 64 and sum(info.cases.values()) == len(split["train"]) + len(split["val"]) + len(split["test"])
    assert DatasetInfo.from_json(info.to_json()) == info
    assert resolve_split(spec, "", (0.8, 0.1, 0.1), 1, out) == split  # a run keeps its own split


def test_a_given_split_is_reused_and_one_of_another_dataset_refused(tmp_path):
    spec = DataSpec("refuge", str(write_refuge(tmp_path / "data")))
    given = write_split({"train": ["g0000", "n0001"], "val": ["g0002"], "test": ["n0003"]}, tmp_path / "mine.json")
    out = tmp_path / "run"
    out.mkdir()
    assert resolve_split(spec, str(given), (0.7, 0.1, 0.2), 0, out)["val"] == ["g0002"]
    other = write_split({"train": ["ISIC_0000001"], "val": ["g0002"], "test": []}, tmp_path / "other.json")
    with pytest.raises(UMLInputError, match="names 1 case.*'ISIC_0000001'"):
        resolve_split(spec, str(other), (0.7, 0.1, 0.2), 0, tmp_path / "run2")
    empty = write_split({"train": ["g0000"], "val": [], "test": []}, tmp_path / "empty.json")
    with pytest.raises(UMLInputError, match="1 training and 0 validation cases"):
        resolve_split(spec, str(empty), (0.7, 0.1, 0.2), 0, tmp_path / "run3")


def _volume_case(mask_slices=(3, 4, 5, 6, 7), label=1):
    rng = np.random.default_rng(0)
    mask = np.zeros((10, 20, 24), np.uint8)
    for z in mask_slices:
        mask[z, 5:5 + z, 6:12] = 1  # the largest section is the last one
    return Case("v", [rng.random((10, 20, 24)).astype(np.float32) * 300], mask, label, (0.7, 0.8, 2.5),
                {"direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)})


def test_a_volume_is_normalised_and_sliced_as_the_predictor_does_and_training_keeps_the_largest_sections():
    case = _volume_case()
    norm = Normalization()
    every = prepare_case(case, Preparation(norm, slices="largest-lesion", lesion_slices=3), training=False)
    assert every.channels.shape == (1, 10, 20, 24) and every.spacing == (0.7, 0.8, 2.5)
    np.testing.assert_array_equal(every.channels[0], normalize(case.images[0], norm))
    kept = prepare_case(case, Preparation(norm, slices="largest-lesion", lesion_slices=3), training=True)
    np.testing.assert_array_equal(kept.channels[0], every.channels[0][[5, 6, 7]])  # 7 is the largest, its 2 nearest
    np.testing.assert_array_equal(kept.mask, case.mask[[5, 6, 7]])
    assert kept.slice_label == "case" and (kept.slice_labels() == 1).all()
    lesion_free = prepare_case(_volume_case(mask_slices=()), Preparation(norm, slices="largest-lesion"), training=True)
    assert lesion_free.channels.shape[1] == 10  # nothing segmented: every slice


def test_a_picture_is_one_slice_resized_to_the_target_size():
    rng = np.random.default_rng(1)
    mask = np.zeros((30, 40), np.uint8)
    mask[10:20, 10:30] = 2
    case = Case("p", [rng.random((30, 40)).astype(np.float32) * 255 for _ in range(3)], mask, 0, (1.0, 1.0))
    prepared = prepare_case(case, Preparation(target_size=(15, 20)), training=True)
    assert prepared.channels.shape == (3, 1, 15, 20) and prepared.mask.shape == (1, 15, 20)
    assert prepared.spacing == (2.0, 2.0, 1.0) and set(np.unique(prepared.mask)) == {0, 2}
    assert prepared.mask[0, 5:10, 5:15].all() and prepared.singles.shape == (0, 1, 15, 20)
    assert 0.0 <= prepared.channels.min() and prepared.channels.max() <= 1.0


def test_labels_outside_the_run_are_refused():
    case = prepare_case(_volume_case(), Preparation(), training=False)
    check_labels(case, SYNTHETIC_INFO)
    case.mask[0, 0, 0] = 3
    with pytest.raises(UMLInputError, match="mask label 3 and class 1, but the run predicts segments 1..1"):
        check_labels(case, SYNTHETIC_INFO)
