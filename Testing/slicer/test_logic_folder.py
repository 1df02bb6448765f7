"""``UMLSegmentationLogic.processFolder``: a folder of files -> per-case .seg.nrrd, uncertainty, summary + one CSV."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

import slicer
from umlslicer_helpers import LESION_TERMINOLOGY, phantom

from UMLSegmentationLib.errors import InputError
from UMLSegmentationLib.logic import RESULTS_CSV, UMLSegmentationLogic


def write_case(path, seed, spacing=(0.8, 0.75, 2.5), origin=(10.0, -20.0, 5.0)):
    image = sitk.GetImageFromArray(phantom(seed).astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return image


def test_process_folder_writes_per_case_files_and_one_csv(mrml, bundle_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = {f"case{i}": write_case(inputs / f"case{i}.nii.gz", i, spacing=(0.8, 0.75, 2.0 + i)) for i in range(3)}
    write_case(inputs / "other.nrrd", 9)  # does not match the pattern
    out = tmp_path / "out"
    nodes_before = mrml.count()
    events = []
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")

    csv_path = logic.processFolder(inputs, out, model=bundle_dir, device="cpu", progressCallback=events.append, reviewThreshold=0.6)

    assert csv_path == out / RESULTS_CSV
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [RESULTS_CSV] + [f"case{i}{suffix}" for i in range(3) for suffix in (".seg.nrrd", "_uncertainty.nrrd", "_summary.json")]
    )
    assert mrml.count() == nodes_before  # no node added to the user's scene
    assert list((tmp_path / "tmp").iterdir()) == []
    assert events[-1].stage == "finished" and all(0.0 <= e.fraction <= 1.0 for e in events)

    rows = list(csv.DictReader(open(csv_path, newline="", encoding="utf-8")))
    assert [r["case_id"] for r in rows] == ["case0", "case1", "case2"]
    for row in rows:
        case = row["case_id"]
        summary = json.loads((out / f"{case}_summary.json").read_text())
        assert summary["case_id"] == case
        assert summary["outputs"] == {"segmentation": f"{case}.seg.nrrd", "uncertainty": f"{case}_uncertainty.nrrd", "summary": f"{case}_summary.json"}
        cls = summary["classification"]
        assert row["status"] == "ok" and row["error"] == ""
        assert row["input"] == str(inputs / f"{case}.nii.gz")
        assert row["predicted_class"] == cls["predicted_class"] and row["verdict"] == cls["verdict"]
        assert float(row["positive_probability"]) == cls["positive_probability"]
        assert float(row["lesion_volume_ml"]) == summary["segments"][0]["volume_ml"]
        assert int(row["lesion_voxel_count"]) == summary["segments"][0]["voxel_count"]
        assert row["model_id"] == "uml-test-small" and row["segmentation_file"] == str(out / f"{case}.seg.nrrd")

        # the uncertainty map lies on the input grid
        unc = sitk.ReadImage(str(out / f"{case}_uncertainty.nrrd"))
        ref = images[case]
        assert unc.GetSize() == ref.GetSize()
        assert np.allclose(unc.GetSpacing(), ref.GetSpacing()) and np.allclose(unc.GetOrigin(), ref.GetOrigin())
        assert np.allclose(unc.GetDirection(), ref.GetDirection())
        u = sitk.GetArrayFromImage(unc)
        assert u.dtype == np.float32 and 0.0 <= u.min() and u.max() <= 1.0

        # the .seg.nrrd carries the card's segment, its terminology, and the Review segment
        seg = slicer.vtkMRMLSegmentationNode()
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(out / f"{case}.seg.nrrd"))
        assert storage.ReadData(seg)
        segmentation = seg.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        assert names == ["Lesion", "Review (uncertain)"]
        assert LESION_TERMINOLOGY["type"]["code"] in segmentation.GetSegment("UML_label_1").GetTerminology()


def test_process_folder_records_a_failing_case_and_goes_on(mrml, bundle_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_case(inputs / "good.nii.gz", 1)
    (inputs / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    out = tmp_path / "out"
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")

    csv_path = logic.processFolder(inputs, out, model=bundle_dir, device="cpu")

    rows = {r["case_id"]: r for r in csv.DictReader(open(csv_path, newline="", encoding="utf-8"))}
    assert list(rows) == ["broken", "good"]
    assert rows["good"]["status"] == "ok" and rows["good"]["predicted_class"] in ("no pCR", "pCR")
    assert rows["broken"]["status"] == "error" and "broken.nii.gz" in rows["broken"]["error"]
    assert rows["broken"]["segmentation_file"] == ""
    assert not (out / "broken.seg.nrrd").exists() and (out / "good.seg.nrrd").exists()
    assert list((tmp_path / "tmp").iterdir()) == []

    with pytest.raises(InputError, match="broken.nii.gz"):
        logic.processFolder(inputs, tmp_path / "out2", model=bundle_dir, device="cpu", onError="raise")
    assert list((tmp_path / "tmp").iterdir()) == []


def test_process_folder_refuses_bad_folders_before_running(mrml, bundle_dir, tmp_path):
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")
    with pytest.raises(InputError, match="does not exist"):
        logic.processFolder(tmp_path / "missing", tmp_path / "out", model=bundle_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no input matches '\*.nii.gz'"):
        logic.processFolder(tmp_path / "empty", tmp_path / "out", model=bundle_dir)
    clash = tmp_path / "clash"
    clash.mkdir()
    write_case(clash / "a.nii.gz", 0)
    write_case(clash / "a.nrrd", 0)
    with pytest.raises(InputError, match=r"case name\(s\) \['a'\]"):
        logic.processFolder(clash, tmp_path / "out", model=bundle_dir, pattern="a.*")
    assert not (tmp_path / "out").exists()
