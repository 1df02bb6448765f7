"""``UMLSegmentationLib.outputs``: from engine files to nodes (output checks, terminology, reuse, subject hierarchy
and transforms)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import slicer
from UMLSegmentationLib.errors import EngineError
from UMLSegmentationLib.models import ModelInfo, SegmentInfo
from UMLSegmentationLib.outputs import (
    OutputNodes,
    createMissingOutputs,
    findPreviousOutputs,
    placeInStudy,
    readCaseOutputs,
    terminologyEntry,
)

from .umlslicer_helpers import IJK_TO_RAS, LESION_TERMINOLOGY, SHAPE_KJI, add_volume

MODEL = ModelInfo(
    path=None, id="m", version="1", name="M", task="t", classes=("a", "b"),
    segments=(SegmentInfo(1, "Lesion", (1.0, 0.0, 0.0), LESION_TERMINOLOGY), SegmentInfo(2, "Other", (0.0, 1.0, 0.0))),
    channels=("pre",), sha256="0" * 64,
)


def test_terminology_entry_round_trips_through_slicer(mrml):
    entry_text = terminologyEntry(MODEL.segments[0])
    entry = slicer.vtkSlicerTerminologyEntry()
    assert mrml.logics["Terminologies"].DeserializeTerminologyEntry(entry_text, entry)
    assert entry.GetTerminologyContextName() == "Segmentation category and type - DICOM master list"
    assert (entry.GetCategoryObject().GetCodingSchemeDesignator(), entry.GetCategoryObject().GetCodeValue()) == ("SCT", "49755003")
    assert entry.GetTypeObject().GetCodeMeaning() == "Neoplasm"
    assert entry.GetRegionObject().GetCodeMeaning() == "Breast"
    assert terminologyEntry(MODEL.segments[1]) == ""  # no codes in the card: no terminology
    only_type = SegmentInfo(3, "x", (0, 0, 1), {"type": LESION_TERMINOLOGY["type"]})
    assert terminologyEntry(only_type) == ""


def write_outputs(folder, labels, uncertainty, ijk_to_ras=IJK_TO_RAS, summary=None):
    folder.mkdir(parents=True)
    for name, array in (("segmentation", labels), ("uncertainty", uncertainty)):
        node = slicer.vtkMRMLScalarVolumeNode()
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
        slicer.util.updateVolumeFromArray(node, array)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(folder / f"{name}.nrrd"))
        assert storage.WriteData(node)
    (folder / "summary.json").write_text(json.dumps(summary or {"case_id": "c", "classification": {}}))
    return folder


def test_engine_outputs_are_checked_against_the_input_and_the_model(tmp_path):
    labels = np.zeros(SHAPE_KJI, np.uint8)
    labels[2, 5:9, 5:9] = 1
    unc = np.full(SHAPE_KJI, 0.25, np.float32)
    dims = tuple(reversed(SHAPE_KJI))
    good = readCaseOutputs(write_outputs(tmp_path / "good", labels, unc), MODEL, "nrrd", dims, IJK_TO_RAS)
    assert good.caseId == "c" and good.labels.dtype == np.uint8 and int(good.labels.sum()) == 16
    assert np.array_equal(good.uncertainty, unc)

    shifted = IJK_TO_RAS.copy()
    shifted[1, 3] += 0.5
    with pytest.raises(EngineError, match="segmentation is not on the input grid"):
        readCaseOutputs(write_outputs(tmp_path / "moved", labels, unc, shifted), MODEL, "nrrd", dims, IJK_TO_RAS)
    with pytest.raises(EngineError, match=r"has \(40, 32, 5\) voxels but the input has \(40, 32, 6\)"):
        readCaseOutputs(write_outputs(tmp_path / "short", labels[:5], unc[:5]), MODEL, "nrrd", dims, IJK_TO_RAS)
    with pytest.raises(EngineError, match=r"labels \[7\] that model 'm' does not declare"):
        readCaseOutputs(write_outputs(tmp_path / "labels", labels * 7, unc), MODEL, "nrrd", dims, IJK_TO_RAS)
    with pytest.raises(EngineError, match="outside 0..1"):
        readCaseOutputs(write_outputs(tmp_path / "range", labels, unc * 5), MODEL, "nrrd", dims, IJK_TO_RAS)
    with pytest.raises(EngineError, match="no classification section"):
        readCaseOutputs(write_outputs(tmp_path / "summary", labels, unc, summary={"case_id": "c"}), MODEL, "nrrd", dims, IJK_TO_RAS)
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "summary.json").write_text(json.dumps({"classification": {}}))
    with pytest.raises(EngineError, match="did not write"):
        readCaseOutputs(tmp_path / "missing", MODEL, "nrrd", dims, IJK_TO_RAS)


def test_outputs_are_found_again_and_follow_the_input(mrml):
    volume = add_volume()
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    sh = mrml.scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "P"), "S")
    sh.CreateItem(study, volume)

    assert findPreviousOutputs(mrml.scene, volume).nodes() == []
    mine = mrml.scene.AddNewNodeByClass("vtkMRMLTableNode", "my table")
    nodes = createMissingOutputs(mrml.scene, volume, OutputNodes(table=mine))
    assert nodes.table is mine and nodes.segmentation.GetName() == "MRBreast UML segmentation"
    placeInStudy(mrml.scene, volume, nodes.nodes())
    for node in nodes.nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    for node in (nodes.segmentation, nodes.uncertainty):  # transformable outputs follow the input's transform
        assert node.GetTransformNodeID() == transform.GetID()
    again = findPreviousOutputs(mrml.scene, volume)
    assert (again.segmentation, again.uncertainty, again.table) == (nodes.segmentation, nodes.uncertainty, mine)
    other = add_volume("other")
    assert findPreviousOutputs(mrml.scene, other).nodes() == []
