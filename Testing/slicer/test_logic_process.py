"""``UMLSegmentationLogic.process``: a volume node -> the real engine in a subprocess -> output nodes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import slicer
from umlslicer_helpers import IJK_TO_RAS, LESION_COLOR, LESION_TERMINOLOGY, add_volume, phantom

from UMLSegmentationLib.inputs import ijkToRasArray, volumeDimensions
from UMLSegmentationLib.logic import UMLSegmentationLogic
from UMLSegmentationLib.outputs import (
    REVIEW_SEGMENT_ID,
    REVIEW_SEGMENT_NAME,
    ROLE_ATTRIBUTE,
    SUMMARY_ATTRIBUTE,
    summaryFromTable,
)
from UMLSegmentationLib.summary import flattenSummary, unflattenRows

OUTPUT_CLASSES = ("vtkMRMLSegmentationNode", "vtkMRMLScalarVolumeNode", "vtkMRMLTableNode", "vtkMRMLNode")


def segment_array(mrml, segmentation_node, segment_id, reference):
    """A segment's voxels on the reference grid (exported through the Segmentations logic)."""
    import vtk

    labelmap = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert mrml.logics["Segmentations"].ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference)
    array = slicer.util.arrayFromVolume(labelmap).copy()
    mrml.scene.RemoveNode(labelmap)
    return array


def test_process_builds_coded_outputs_on_the_input_grid_and_rerun_reuses_them(mrml, volume, bundle_dir, tmp_path):
    composite = mrml.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    original = slicer.util.arrayFromVolume(volume).copy()
    events = []
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")

    result = logic.process(volume, model=bundle_dir, device="cpu", progressCallback=events.append, reviewThreshold=0.5)

    # progress: the module's own stages around the engine's JSON stages, fractions in 0..1
    stages = [e.stage for e in events]
    assert stages[0] == "prepare" and stages[-1] == "finished"
    assert {"read", "inference", "write", "done"} <= set(stages)
    assert all(0.0 <= e.fraction <= 1.0 for e in events)

    # segmentation: the card's segment (name, colour, terminology) + the Review segment
    seg = result.segmentationNode.GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    assert ids == ["UML_label_1", REVIEW_SEGMENT_ID]
    lesion = seg.GetSegment("UML_label_1")
    assert lesion.GetName() == "Lesion"
    assert lesion.GetColor() == pytest.approx(LESION_COLOR)
    entry = slicer.vtkSlicerTerminologyEntry()
    assert mrml.logics["Terminologies"].DeserializeTerminologyEntry(lesion.GetTerminology(), entry)
    assert entry.GetCategoryObject().GetCodeValue() == LESION_TERMINOLOGY["category"]["code"]
    assert entry.GetTypeObject().GetCodeValue() == LESION_TERMINOLOGY["type"]["code"]
    assert entry.GetTypeObject().GetCodeMeaning() == "Neoplasm"
    assert entry.GetRegionObject().GetCodeValue() == LESION_TERMINOLOGY["region"]["code"]
    assert seg.GetSegment(REVIEW_SEGMENT_ID).GetName() == REVIEW_SEGMENT_NAME

    # uncertainty: exactly the input's grid, float32 in 0..1, heat colours, window 0..1, shown as overlay
    unc = result.uncertaintyVolumeNode
    assert volumeDimensions(unc) == volumeDimensions(volume)
    assert np.array_equal(ijkToRasArray(unc), ijkToRasArray(volume))
    assert np.array_equal(ijkToRasArray(unc), IJK_TO_RAS)
    u = slicer.util.arrayFromVolume(unc)
    assert u.dtype == np.float32 and 0.0 <= u.min() and u.max() <= 1.0 and u.std() > 0
    display = unc.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.0, 1.0))
    assert composite.GetForegroundVolumeID() == unc.GetID() and composite.GetBackgroundVolumeID() == volume.GetID()

    # the segments agree with the engine's numbers and the review mask with the uncertainty map
    lesion_voxels = segment_array(mrml, result.segmentationNode, "UML_label_1", volume)
    assert int(lesion_voxels.sum()) == result.summary["segments"][0]["voxel_count"]
    review = segment_array(mrml, result.segmentationNode, REVIEW_SEGMENT_ID, volume)
    assert np.array_equal(review > 0, u > 0.5)

    # table: the summary, row for row; the JSON rides along as an attribute
    rows = summaryFromTable(result.tableNode)
    assert rows == flattenSummary(result.summary)
    assert unflattenRows(rows) == result.summary
    assert json.loads(result.tableNode.GetAttribute(SUMMARY_ATTRIBUTE)) == result.summary
    cls = result.summary["classification"]
    assert dict(rows)["classification.predicted_class"] == cls["predicted_class"]
    assert cls["classes"] == ["no pCR", "pCR"] and cls["verdict"] in ("reliable", "review")
    assert result.summary["outputs"] == {
        "segmentation_node": result.segmentationNode.GetID(),
        "uncertainty_node": unc.GetID(),
        "table_node": result.tableNode.GetID(),
    }
    assert all("path" not in e and e["node_id"] == volume.GetID() for e in result.summary["inputs"])

    # subject hierarchy: beside the input, under its study
    sh = mrml.scene.GetSubjectHierarchyNode()
    study = sh.GetItemParent(sh.GetItemByDataNode(volume))
    for node in (result.segmentationNode, unc, result.tableNode):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
        assert node.GetAttribute(ROLE_ATTRIBUTE)

    # the input is untouched
    assert np.array_equal(slicer.util.arrayFromVolume(volume), original)
    assert volume.GetStorageNode() is None

    # a second run updates the same nodes instead of adding copies
    counts = {c: mrml.count(c) for c in OUTPUT_CLASSES}
    again = logic.process(volume, model=bundle_dir, device="cpu")  # no Review segment this time
    assert {c: mrml.count(c) for c in OUTPUT_CLASSES} == counts
    assert again.segmentationNode is result.segmentationNode
    assert again.uncertaintyVolumeNode is unc and again.tableNode is result.tableNode
    seg = again.segmentationNode.GetSegmentation()
    assert [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())] == ["UML_label_1"]
    assert summaryFromTable(again.tableNode) == flattenSummary(again.summary)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_process_three_phase_volumes_and_a_multiframe_volume(mrml, bundle_dir, tmp_path):
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")
    pre = add_volume("pre", phantom(1, enhancement=0.0))
    early = add_volume("early", phantom(2, enhancement=1.0))
    late = add_volume("late", phantom(3, enhancement=0.7))
    result = logic.process(pre, model=bundle_dir, device="cpu", phaseNodes=[early, late], display="none")
    assert [(e["channel"], e["node_name"]) for e in result.summary["inputs"]] == [("pre", "pre"), ("early", "early"), ("late", "late")]
    assert result.segmentationNode.GetName() == "pre UML segmentation"
    assert np.array_equal(ijkToRasArray(result.uncertaintyVolumeNode), IJK_TO_RAS)

    # the same phases as one 3-frame volume (components are split into the three channels)
    frames = np.stack([slicer.util.arrayFromVolume(n) for n in (pre, early, late)], axis=-1).astype(np.float32)
    multi = add_volume("dce4d", frames, node_class="vtkMRMLVectorVolumeNode")
    result4d = logic.process(multi, model=bundle_dir, device="cpu", display="none")
    assert [(e["channel"], e["frame"]) for e in result4d.summary["inputs"]] == [("pre", 0), ("early", 1), ("late", 2)]
    # same voxels in, same network -> same classification as the three separate volumes
    assert result4d.summary["classification"]["probabilities"] == pytest.approx(result.summary["classification"]["probabilities"], abs=1e-6)
    assert np.array_equal(slicer.util.arrayFromVolume(result4d.uncertaintyVolumeNode), slicer.util.arrayFromVolume(result.uncertaintyVolumeNode))
    assert result4d.segmentationNode is not result.segmentationNode  # another input -> its own outputs
