"""``UMLSegmentationLib.sampledata``: the shipped sample case (checksums, registration arguments, regeneration) and
what the shipped model finds in it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import slicer
from UMLSegmentationLib.paths import moduleDirectory, sampleDataDirectory
from UMLSegmentationLib.sampledata import (SAMPLE_CASES, SAMPLE_CATEGORY, fileSha256, sampleDataSources,
                                           syntheticSampleCase, writeSyntheticSample)


def read_array(path: Path):
    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return slicer.util.arrayFromVolume(node).copy(), slicer.util.arrayFromVTKMatrix(_matrix(node))


def _matrix(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return m


def test_shipped_files_match_their_checksums_and_registration():
    (case,) = SAMPLE_CASES
    for f in case.files:
        assert fileSha256(sampleDataDirectory() / f.fileName) == f.sha256, f.fileName
    (source,) = sampleDataSources(moduleDirectory())
    assert source["category"] == SAMPLE_CATEGORY and source["sampleName"] == case.name
    assert source["checksums"] == [f"SHA256:{f.sha256}" for f in case.files]
    assert [Path(u.replace("file://", "")).name for u in source["uris"]] == [f.fileName for f in case.files]
    assert all(u.startswith("file:///") for u in source["uris"]) and Path(source["thumbnailFileName"]).is_file()
    assert source["nodeNames"] == ["UMLSyntheticBreastDCE-pre", "UMLSyntheticBreastDCE-early", "UMLSyntheticBreastDCE-late"]


def test_sample_regenerates_with_the_same_voxels_and_geometry(tmp_path):
    written = writeSyntheticSample(tmp_path)
    for f, path in zip(SAMPLE_CASES[0].files, written):
        shipped, shipped_matrix = read_array(sampleDataDirectory() / f.fileName)
        fresh, fresh_matrix = read_array(path)
        assert fresh.dtype == np.int16 and fresh.shape == (32, 128, 128)
        assert np.allclose(fresh_matrix, shipped_matrix)
        # the same voxels up to the int16 rounding of a few: float sums round differently between numpy releases
        # (numpy 2.4.6: 4 of 1.5 M voxels one unit off the shipped files)
        off = np.abs(fresh.astype(np.int32) - shipped)
        assert off.max() <= 1 and np.count_nonzero(off) <= 20, (f.fileName, off.max(), np.count_nonzero(off))
    pre, early = (read_array(p)[0].astype(float) for p in written[:2])
    assert early.max() > pre.max()  # the lesion enhances


def test_the_shipped_model_finds_the_sample_lesion_and_calls_it_suspicious(shipped_sample_prediction):
    """The README's main job, pinned: a retrained bundle that loses it fails here."""
    import SimpleITK as sitk
    from umlcore import metrics

    pred = shipped_sample_prediction
    truth = syntheticSampleCase()
    assert truth.label == 1 and len(truth.lesions) == 1  # a spiculated lesion with washout: "high suspicion"
    assert metrics.dice(sitk.GetArrayFromImage(pred.labelmap), truth.mask) > 0.35  # 0.44 for 1.2.x (coarse grid)
    c = pred.summary["classification"]
    assert c["predicted_class"] == c["positive_class"] and c["verdict"] == "reliable"
    true_ml = truth.mask.sum() * np.prod(truth.spacing) / 1000
    assert pred.summary["segments"][0]["volume_ml"] == pytest.approx(true_ml, rel=0.25)


def test_the_sample_runs_with_its_three_phases(mrml, bundle_dir, tmp_path):
    """Sample Data loads three phase nodes; with the first as input the module selects the other two, so the run
    uses the model's three channels instead of replicating one volume."""
    from UMLSegmentationLib.logic import UMLSegmentationLogic
    from UMLSegmentationLib.sampledata import samplePhases

    from .umlslicer_helpers import add_volume, phantom

    names = [f.nodeName for f in SAMPLE_CASES[0].files]
    first = [add_volume(n, phantom(seed=i, enhancement=0.5 * i + 0.2)) for i, n in enumerate(names)]
    again = [add_volume(f"{n}_1") for n in names]  # the case loaded a second time
    other = add_volume("MRBreast")
    assert samplePhases(first[0], mrml.scene) == first[1:]
    assert samplePhases(again[0], mrml.scene) == again[1:]
    assert samplePhases(first[1], mrml.scene) == [] and samplePhases(other, mrml.scene) == []
    mrml.scene.RemoveNode(again[2])
    assert samplePhases(again[0], mrml.scene) == []  # a phase is missing: nothing half-selected
    result = UMLSegmentationLogic(temporaryDirectory=tmp_path).process(
        first[0], model=bundle_dir, device="cpu", phaseNodes=samplePhases(first[0], mrml.scene))
    assert [e["node_name"] for e in result.summary["inputs"]] == names
