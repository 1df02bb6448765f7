"""Dataset adapters on tiny fixtures fabricated in tmp_path in each dataset's real layout; splits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from training.datasets import (
    ADAPTERS,
    Case,
    DatasetLayoutError,
    FolderDataset,
    ISIC2017Dataset,
    ISPY1Dataset,
    REFUGEDataset,
    open_dataset,
    read_split,
    refuge_mask_to_labels,
    split_cases,
    write_split,
)
from training.datasets.base import parse_binary_label, read_table

# ---------------------------------------------------------------------------------------------------- helpers


def write_volume(path: Path, array: np.ndarray, spacing=(0.7, 0.7, 2.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def write_picture(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_csv(path: Path, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(str(v) for v in r) for r in rows) + "\n", encoding="utf-8")


def rgb_image(seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=3)
    return np.broadcast_to(base, (size, size, 3)).astype(np.uint8).copy()


# ---------------------------------------------------------------------------------------------------- I-SPY1


def make_ispy(root: Path) -> dict[str, np.ndarray]:
    """Subjects 1001 (pCR 0), 1002 (pCR 1, mask stored 0/255), 1003 (empty PCR), 1004 (in table, no images),
    1005 (images, not in table)."""
    vols = {}
    for i, sid in enumerate(("1001", "1002", "1003", "1005")):
        vol = np.random.default_rng(i).random((6, 16, 16)).astype(np.float32) * 100
        vols[sid] = vol
        write_volume(root / "Dataset ISPY" / f"ISPY_{sid}" / "DCEMRI_1.nii", vol)
        mask = np.zeros((6, 16, 16), np.uint8)
        mask[2:4, 5:9, 6:10] = 255 if sid == "1002" else 1
        write_volume(root / "Tumor_segmentation_new" / f"ISPY_{sid}_tumor_mask.nii", mask)
    write_csv(root / "outcome_new.csv", [["SUBJECTID", "AGE", "PCR"], [1001, 40, 0], [1002, 51, 1], [1003, 47, ""],
                                         [1004, 60, 1]])
    return vols


def test_ispy1_reads_uml_layout(tmp_path):
    vols = make_ispy(tmp_path)
    ds = ISPY1Dataset(tmp_path)
    assert ds.case_ids() == ["ISPY_1001", "ISPY_1002"]
    assert ds.labels() == {"ISPY_1001": 0, "ISPY_1002": 1}
    assert ds.groups() == {"ISPY_1001": "1001", "ISPY_1002": "1002"}
    assert set(ds.skipped) == {"ISPY_1003", "ISPY_1004", "ISPY_1005"}
    assert "PCR" in ds.skipped["ISPY_1003"] and "no folder" in ds.skipped["ISPY_1004"]
    assert "not in outcome_new.csv" in ds.skipped["ISPY_1005"]

    case = ds.load("ISPY_1002")
    assert isinstance(case, Case) and case.label == 1 and case.num_channels == 1
    assert case.images[0].dtype == np.float32 and case.images[0].shape == (6, 16, 16)
    np.testing.assert_allclose(case.images[0], vols["1002"])
    assert case.spacing == pytest.approx((0.7, 0.7, 2.0))
    assert case.mask.dtype == np.uint8 and set(np.unique(case.mask)) == {0, 1}  # 255 -> 1
    assert int(case.mask.sum()) == 2 * 4 * 4
    assert case.meta["patient_id"] == "1002" and case.array.shape == (1, 6, 16, 16)
    with pytest.raises(DatasetLayoutError, match="ISPY_1003"):
        ds.load("ISPY_1003")


def test_ispy1_4d_phases_and_several_files(tmp_path):
    make_ispy(tmp_path)
    phases = [np.full((6, 16, 16), float(t), np.float32) for t in range(3)]
    img4 = sitk.JoinSeries([sitk.GetImageFromArray(p) for p in phases])
    sitk.WriteImage(img4, str(tmp_path / "Dataset ISPY" / "ISPY_1001" / "DCEMRI_1.nii.gz"))
    (tmp_path / "Dataset ISPY" / "ISPY_1001" / "DCEMRI_1.nii").unlink()
    case = ISPY1Dataset(tmp_path).load("ISPY_1001")
    assert case.num_channels == 3
    assert [float(c.mean()) for c in case.images] == [0.0, 1.0, 2.0]
    # two files -> two channels; a subject missing the second is left out
    write_volume(tmp_path / "Dataset ISPY" / "ISPY_1002" / "DCEMRI_2.nii", np.zeros((6, 16, 16), np.float32))
    ds = ISPY1Dataset(tmp_path, phases=("DCEMRI_1", "DCEMRI_2"))
    assert ds.case_ids() == ["ISPY_1002"] and "DCEMRI_2" in ds.skipped["ISPY_1001"]
    assert ds.load("ISPY_1002").num_channels == 2


def test_ispy1_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        ISPY1Dataset(tmp_path / "nowhere")
    (tmp_path / "Dataset ISPY").mkdir()
    with pytest.raises(DatasetLayoutError, match="Tumor_segmentation_new") as err:
        ISPY1Dataset(tmp_path)
    assert "ISPY_<SUBJECTID>/DCEMRI_1.nii" in str(err.value)  # the expected layout is shown
    (tmp_path / "Tumor_segmentation_new").mkdir()
    with pytest.raises(DatasetLayoutError, match="outcome_new.csv"):
        ISPY1Dataset(tmp_path)
    write_csv(tmp_path / "outcome_new.csv", [["SUBJECTID", "RESPONSE"], [1001, 0]])
    with pytest.raises(DatasetLayoutError, match=r"columns \['SUBJECTID', 'PCR'\]"):
        ISPY1Dataset(tmp_path)


def test_ispy1_incomplete_error_mode_and_bad_label(tmp_path):
    make_ispy(tmp_path)
    with pytest.raises(DatasetLayoutError, match="3 incomplete") as err:
        ISPY1Dataset(tmp_path, incomplete="error")
    assert "ISPY_1004" in str(err.value)
    write_csv(tmp_path / "outcome_new.csv", [["SUBJECTID", "PCR"], [1001, 2]])
    with pytest.raises(DatasetLayoutError, match="1001.*not binary"):
        ISPY1Dataset(tmp_path)


def test_ispy1_mask_on_other_grid(tmp_path):
    make_ispy(tmp_path)
    write_volume(tmp_path / "Tumor_segmentation_new" / "ISPY_1001_tumor_mask.nii", np.zeros((5, 16, 16), np.uint8))
    with pytest.raises(DatasetLayoutError, match="one voxel grid"):
        ISPY1Dataset(tmp_path).load("ISPY_1001")


def test_xlsx_outcome_needs_openpyxl(tmp_path, monkeypatch):
    make_ispy(tmp_path)
    (tmp_path / "outcome_new.csv").unlink()
    (tmp_path / "outcome_new.xlsx").write_bytes(b"not really a workbook")
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # import openpyxl -> ImportError
    with pytest.raises(DatasetLayoutError, match="openpyxl") as err:
        ISPY1Dataset(tmp_path)
    assert "outcome_new.csv" in str(err.value)  # the dependency-free alternative is named


def test_xlsx_outcome_with_openpyxl(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    make_ispy(tmp_path)
    (tmp_path / "outcome_new.csv").unlink()
    book = openpyxl.Workbook()
    sheet = book.active
    for row in (["SUBJECTID", "PCR"], [1001, 0], [1002, 1]):
        sheet.append(row)
    book.save(tmp_path / "outcome_new.xlsx")
    assert ISPY1Dataset(tmp_path).labels() == {"ISPY_1001": 0, "ISPY_1002": 1}


# ---------------------------------------------------------------------------------------------------- REFUGE


def refuge_mask(size: int = 16) -> np.ndarray:
    grey = np.full((size, size), 255, np.uint8)  # background
    grey[4:12, 4:12] = 128  # disc rim
    grey[6:10, 6:10] = 0  # cup
    return grey


def make_refuge(root: Path) -> None:
    for cls, ids in (("Glaucoma", ["g0001", "g0002"]), ("Non-Glaucoma", ["n0001", "n0002", "n0003"])):
        for i, cid in enumerate(ids):
            write_picture(root / "Training400" / cls / f"{cid}.jpg", rgb_image(i))
            write_picture(root / "Annotation-Training400" / "Disc_Cup_Masks" / cls / f"{cid}.bmp", refuge_mask())
            # drawings shipped with the annotations must not be taken for images
            write_picture(root / "Annotation-Training400" / "Disc_Cup_Fovea_Illustration" / f"{cid}.jpg", rgb_image(9))
    for cid in ("V0001", "V0002"):
        write_picture(root / "REFUGE-Validation400" / f"{cid}.jpg", rgb_image(3))
        write_picture(root / "REFUGE-Validation400-GT" / "Disc_Cup_Masks" / f"{cid}.bmp", refuge_mask())
    write_csv(root / "REFUGE-Validation400-GT" / "Glaucoma_label_and_Fovea_location.csv",
              [["ID", "ImgName", "Fovea_X", "Fovea_Y", "Glaucoma Label"], [1, "V0001.jpg", 8, 8, 1],
               [2, "V0002.jpg", 8, 8, 0]])


def test_refuge_mask_mapping():
    grey = np.array([[0, 30, 64, 128, 191, 192, 255]], np.uint8)
    np.testing.assert_array_equal(refuge_mask_to_labels(grey), [[2, 2, 1, 1, 1, 0, 0]])


def test_refuge_reads_challenge_layout(tmp_path):
    make_refuge(tmp_path)
    ds = REFUGEDataset(tmp_path)
    assert ds.case_ids() == ["V0001", "V0002", "g0001", "g0002", "n0001", "n0002", "n0003"]
    assert ds.labels() == {"V0001": 1, "V0002": 0, "g0001": 1, "g0002": 1, "n0001": 0, "n0002": 0, "n0003": 0}
    assert ds.skipped == {}
    case = ds.load("g0002")
    assert case.num_channels == 3 and case.images[0].shape == (16, 16) and case.images[0].dtype == np.float32
    expected = rgb_image(1)[0, 0].astype(float)
    np.testing.assert_allclose([c.mean() for c in case.images], expected, atol=6)  # JPEG is lossy
    assert case.spacing == (1.0, 1.0)
    counts = np.bincount(case.mask.ravel(), minlength=3)
    assert counts.tolist() == [16 * 16 - 64, 64 - 16, 16]  # background, rim, cup
    assert case.meta["label_source"] == "folder"
    assert ds.load("V0001").meta["label_source"] == "Glaucoma_label_and_Fovea_location.csv"


def test_refuge_missing_parts(tmp_path):
    with pytest.raises(DatasetLayoutError, match="no fundus image"):
        REFUGEDataset(tmp_path)
    write_picture(tmp_path / "Training400" / "Glaucoma" / "g0001.jpg", rgb_image(0))
    with pytest.raises(DatasetLayoutError, match="Disc_Cup_Masks"):
        REFUGEDataset(tmp_path)
    make_refuge(tmp_path)
    (tmp_path / "REFUGE-Validation400-GT" / "Glaucoma_label_and_Fovea_location.csv").unlink()
    (tmp_path / "Annotation-Training400" / "Disc_Cup_Masks" / "Glaucoma" / "g0002.bmp").unlink()
    ds = REFUGEDataset(tmp_path)
    assert set(ds.skipped) == {"V0001", "V0002", "g0002"}
    assert "no label" in ds.skipped["V0001"] and "no mask" in ds.skipped["g0002"]
    with pytest.raises(DatasetLayoutError, match="3 incomplete"):
        REFUGEDataset(tmp_path, incomplete="error")


def test_refuge_conflicting_labels(tmp_path):
    make_refuge(tmp_path)
    labels = tmp_path / "labels.csv"
    write_csv(labels, [["ImgName", "Glaucoma Label"], ["g0001.jpg", 0]])
    with pytest.raises(DatasetLayoutError, match="g0001 is labelled 1 by its folder but 0"):
        REFUGEDataset(tmp_path, label_file=labels)


# ---------------------------------------------------------------------------------------------------- ISIC 2017


def make_isic(root: Path) -> None:
    subsets = {"Training": ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"], "Validation": ["ISIC_0001769"]}
    for subset, ids in subsets.items():
        rows = [["image_id", "melanoma", "seborrheic_keratosis"]]
        for i, cid in enumerate(ids):
            write_picture(root / f"ISIC-2017_{subset}_Data" / f"{cid}.jpg", rgb_image(i))
            write_picture(root / f"ISIC-2017_{subset}_Data" / f"{cid}_superpixels.png", rgb_image(7))
            mask = np.zeros((16, 16), np.uint8)
            mask[3:9, 2:12] = 255
            write_picture(root / f"ISIC-2017_{subset}_Part1_GroundTruth" / f"{cid}_segmentation.png", mask)
            rows.append([cid, "1.0" if i == 1 else "0.0", "1.0" if i == 2 else "0.0"])
        write_csv(root / f"ISIC-2017_{subset}_Part3_GroundTruth.csv", rows)


def test_isic2017_reads_challenge_layout(tmp_path):
    make_isic(tmp_path)
    ds = ISIC2017Dataset(tmp_path)
    assert ds.case_ids() == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002", "ISIC_0001769"]
    assert ds.labels() == {"ISIC_0000000": 0, "ISIC_0000001": 1, "ISIC_0000002": 0, "ISIC_0001769": 0}
    case = ds.load("ISIC_0000001")
    assert case.num_channels == 3 and case.mask.dtype == np.uint8
    assert set(np.unique(case.mask)) == {0, 1} and int(case.mask.sum()) == 6 * 10
    assert case.meta["subset"] == "Training" and case.meta["seborrheic_keratosis"] == 0
    assert ds.subset_of("ISIC_0001769") == "Validation"
    assert ISIC2017Dataset(tmp_path, subsets=["Validation"]).case_ids() == ["ISIC_0001769"]
    sk = ISIC2017Dataset(tmp_path, label_column="seborrheic_keratosis")
    assert sk.labels()["ISIC_0000002"] == 1 and sk.class_names[1] == "seborrheic keratosis"


def test_isic2017_bad_layouts(tmp_path):
    with pytest.raises(DatasetLayoutError, match="Part3_GroundTruth.csv"):
        ISIC2017Dataset(tmp_path)
    make_isic(tmp_path)
    with pytest.raises(DatasetLayoutError, match=r"subset\(s\) \['Test_v2'\] not found"):
        ISIC2017Dataset(tmp_path, subsets=["Test_v2"])
    (tmp_path / "ISIC-2017_Training_Part1_GroundTruth" / "ISIC_0000002_segmentation.png").unlink()
    ds = ISIC2017Dataset(tmp_path)
    assert ds.skipped == {"ISIC_0000002": "no mask ISIC_0000002_segmentation.png"}
    with pytest.raises(DatasetLayoutError, match="ISIC_0000002"):
        ISIC2017Dataset(tmp_path, incomplete="error")
    import shutil

    shutil.rmtree(tmp_path / "ISIC-2017_Training_Part1_GroundTruth")
    shutil.rmtree(tmp_path / "ISIC-2017_Validation_Part1_GroundTruth")
    with pytest.raises(DatasetLayoutError, match="_segmentation.png"):
        ISIC2017Dataset(tmp_path)


# ---------------------------------------------------------------------------------------------------- folder


def make_folder(root: Path) -> None:
    write_picture(root / "images" / "a.png", rgb_image(0))
    m = np.zeros((16, 16), np.uint8)
    m[4:8, 4:8] = 255
    write_picture(root / "masks" / "a.png", m)
    write_picture(root / "images" / "b.png", np.full((16, 16), 77, np.uint8))  # grey -> 1 channel
    mb = np.zeros((16, 16), np.uint8)
    mb[0:2, :] = 1
    mb[2:3, :] = 2
    write_picture(root / "masks" / "b.png", mb)
    vol = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    write_volume(root / "images" / "c.nii.gz", vol, spacing=(0.5, 0.6, 3.0))
    mc = np.zeros((4, 8, 8), np.uint8)
    mc[1, 2:4, 2:4] = 2
    write_volume(root / "masks" / "c.nii.gz", mc, spacing=(0.5, 0.6, 3.0))
    for i, name in enumerate(("0_pre.nrrd", "1_early.nrrd", "2_late.nrrd")):
        write_volume(root / "images" / "d" / name, np.full((4, 8, 8), float(i), np.float32))
    write_volume(root / "masks" / "d.nrrd", np.zeros((4, 8, 8), np.uint8))
    write_picture(root / "images" / "unlisted.png", rgb_image(5))
    write_csv(root / "labels.csv", [["case", "label", "patient"], ["a", 1, "p1"], ["b", 0, "p1"], ["c", "yes", ""],
                                    ["d", 2, "p2"], ["e", 0, "p3"]])


def test_folder_dataset_reads_pictures_volumes_and_channel_folders(tmp_path):
    make_folder(tmp_path)
    ds = open_dataset("folder", tmp_path)
    assert isinstance(ds, FolderDataset) and set(ADAPTERS) == {"ispy1", "refuge", "isic2017", "folder"}
    assert ds.case_ids() == ["a", "b", "c", "d"]
    assert ds.labels() == {"a": 1, "b": 0, "c": 1, "d": 2}
    assert ds.class_names == ("0", "1", "2")
    assert ds.groups() == {"a": "p1", "b": "p1", "c": "c", "d": "p2"}
    assert set(ds.skipped) == {"e", "unlisted"}
    a = ds.load("a")
    assert a.num_channels == 3 and a.spacing == (1.0, 1.0)
    assert set(np.unique(a.mask)) == {0, 1}  # 0/255 -> 0/1
    b = ds.load("b")
    assert b.num_channels == 1 and float(b.images[0].mean()) == 77.0
    assert np.bincount(b.mask.ravel()).tolist() == [13 * 16, 2 * 16, 16]  # labels kept as stored
    c = ds.load("c")
    assert c.images[0].shape == (4, 8, 8) and c.spacing == pytest.approx((0.5, 0.6, 3.0))
    np.testing.assert_array_equal(c.images[0], np.arange(256, dtype=np.float32).reshape(4, 8, 8))
    assert int((c.mask == 2).sum()) == 4
    d = ds.load("d")
    assert [float(x.mean()) for x in d.images] == [0.0, 1.0, 2.0]


def test_folder_dataset_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="images.*masks.*labels.csv") as err:
        FolderDataset(tmp_path)
    assert "columns: case, label" in str(err.value)
    make_folder(tmp_path)
    (tmp_path / "images" / "notes.txt").write_text("x")
    with pytest.raises(DatasetLayoutError, match="notes.txt has an unsupported extension"):
        FolderDataset(tmp_path)
    (tmp_path / "images" / "notes.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="e: no image"):
        FolderDataset(tmp_path, incomplete="error")
    write_csv(tmp_path / "labels.csv", [["case", "label"], ["a", "maybe"]])
    with pytest.raises(DatasetLayoutError, match="not a class index"):
        FolderDataset(tmp_path)
    write_csv(tmp_path / "labels.csv", [["case", "label"], ["a", 1]])
    write_picture(tmp_path / "masks" / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetLayoutError, match="differ in shape"):
        FolderDataset(tmp_path).load("a")


def test_tables_and_label_parsing(tmp_path):
    write_csv(tmp_path / "t.csv", [["Image Name", "GLAUCOMA_label"], ["x", "1"], ["", ""]])
    assert read_table(tmp_path / "t.csv", ["image name", "Glaucoma Label"]) == [
        {"image name": "x", "Glaucoma Label": "1"}
    ]
    assert [parse_binary_label(v) for v in (0, 1.0, "1", "0.0", "Yes", "no", "TRUE", "", "NA", None)] == [
        0, 1, 1, 0, 1, 0, 1, None, None, None
    ]
    with pytest.raises(DatasetLayoutError):
        parse_binary_label("2")


# ---------------------------------------------------------------------------------------------------- splits


def test_split_is_deterministic_stratified_and_disjoint():
    ids = [f"case{i:03d}" for i in range(100)]
    labels = {c: int(i >= 70) for i, c in enumerate(ids)}  # 70 negatives, 30 positives
    s1 = split_cases(ids, labels, seed=0)
    s2 = split_cases(list(reversed(ids)), dict(reversed(list(labels.items()))), seed=0)
    assert s1 == s2  # independent of input order
    assert split_cases(ids, labels, seed=1) != s1
    assert sorted(s1["train"] + s1["val"] + s1["test"]) == ids
    assert not (set(s1["train"]) & set(s1["val"])) and not (set(s1["train"]) & set(s1["test"]))
    assert not (set(s1["val"]) & set(s1["test"]))
    per_label = {name: [sum(labels[c] == lab for c in v) for lab in (0, 1)] for name, v in s1.items()}
    assert per_label == {"train": [49, 21], "val": [7, 3], "test": [14, 6]}


def test_split_keeps_patients_together():
    ids, labels, groups = [], {}, {}
    for p in range(20):
        for k in range(3):
            cid = f"p{p:02d}_s{k}"
            ids.append(cid)
            labels[cid] = p % 2
            groups[cid] = f"p{p:02d}"
    split = split_cases(ids, labels, fractions=(0.6, 0.2, 0.2), seed=4, groups=groups)
    where = {}
    for name, cases in split.items():
        for c in cases:
            assert where.setdefault(groups[c], name) == name  # every case of a patient in one split
    assert [len(split[n]) for n in ("train", "val", "test")] == [36, 12, 12]


def test_split_validation_and_adapter_split(tmp_path):
    with pytest.raises(DatasetLayoutError, match="fractions"):
        split_cases(["a", "b"], {"a": 0, "b": 1}, fractions=(0.5, 0.6, 0.1))
    with pytest.raises(DatasetLayoutError, match="no label"):
        split_cases(["a", "b"], {"a": 0})
    with pytest.raises(DatasetLayoutError, match="unique"):
        split_cases(["a", "a"], {"a": 0})
    make_folder(tmp_path)
    split = FolderDataset(tmp_path).split(fractions=(0.5, 0.0, 0.5), seed=0)
    where = {c: n for n, cs in split.items() for c in cs}
    assert where["a"] == where["b"]  # same patient p1
    assert sorted(where) == ["a", "b", "c", "d"]


def test_write_read_split_round_trip(tmp_path):
    split = {"train": ["a", "b"], "val": ["c"], "test": ["d"]}
    path = write_split(split, tmp_path / "splits" / "split.json")
    assert read_split(path) == split
    assert json.loads(path.read_text()) == split
    path.write_text(json.dumps({"train": ["a"], "test": ["a"]}))
    with pytest.raises(DatasetLayoutError, match="'a' is in both"):
        read_split(path)
    path.write_text(json.dumps({"training": ["a"]}))
    with pytest.raises(DatasetLayoutError, match="unknown split name"):
        read_split(path)
    with pytest.raises(DatasetLayoutError, match="not found"):
        read_split(tmp_path / "missing.json")


def test_nibabel_fallback_matches_simpleitk(tmp_path):
    from training.datasets.base import _read_volume_nibabel, read_volume

    vol = np.random.default_rng(0).random((5, 7, 9)).astype(np.float32)
    path = tmp_path / "v.nii.gz"
    write_volume(path, vol, spacing=(0.5, 0.8, 2.5))
    sitk_channels, sitk_spacing, _ = read_volume(path)
    nib_channels, nib_spacing, geometry = _read_volume_nibabel(path, RuntimeError("refused"))
    np.testing.assert_array_equal(nib_channels[0], sitk_channels[0])
    np.testing.assert_array_equal(nib_channels[0], vol)
    assert nib_spacing == pytest.approx(sitk_spacing)
    assert nib_spacing == pytest.approx((0.5, 0.8, 2.5))
    assert geometry["reader"] == "nibabel"
