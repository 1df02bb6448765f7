"""From the engine's files to MRML nodes: segmentation, uncertainty volume, summary table.

Reading and checking the engine's outputs (:func:`readEngineOutputs`) touches no scene; only when every
file has been read and checked are nodes created or updated, so a failed or cancelled run leaves the scene
as it was. Output nodes are tagged with the attribute ``UML.Role`` and a node reference to their input, so a
re-run finds and updates them instead of adding copies (and a saved scene keeps the link).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import vtk

import slicer

from .errors import EngineError
from .inputs import GEOMETRY_TOLERANCE_MM, ijkToRasArray
from .models import ModelInfo, SegmentInfo
from .summary import FIELD_COLUMN, VALUE_COLUMN, flattenSummary

__all__ = [
    "ROLE_ATTRIBUTE",
    "SUMMARY_ATTRIBUTE",
    "INPUT_REFERENCE_ROLE",
    "REVIEW_SEGMENT_ID",
    "REVIEW_SEGMENT_NAME",
    "REVIEW_SEGMENT_COLOR",
    "HEAT_COLOR_NODE_IDS",
    "OVERLAY_FLOOR",
    "TERMINOLOGY_CONTEXT",
    "ANATOMIC_CONTEXT",
    "EngineOutputs",
    "OutputNodes",
    "readVolumeFile",
    "findCaseDirectory",
    "readCaseOutputs",
    "readEngineOutputs",
    "segmentIdFor",
    "labelmapImage",
    "terminologyEntry",
    "setSegmentTerminology",
    "nodesByClass",
    "nodesByName",
    "StagedOutputs",
    "stageOutputs",
    "findPreviousOutputs",
    "createMissingOutputs",
    "updateSegmentation",
    "updateUncertaintyVolume",
    "updateSummaryTable",
    "summaryFromTable",
    "placeInStudy",
    "showOverlay",
    "writeSegmentationFile",
    "writeVolumeFile",
]

ROLE_ATTRIBUTE = "UML.Role"
SUMMARY_ATTRIBUTE = "UML.SummaryJSON"
INPUT_REFERENCE_ROLE = "UMLInputVolume"
REVIEW_SEGMENT_ID = "UML_review"
REVIEW_SEGMENT_NAME = "Review (uncertain)"
REVIEW_SEGMENT_COLOR = (1.0, 0.85, 0.0)
#: Heat colour maps, first one present in the scene wins (PET-Heat is built into every Slicer).
HEAT_COLOR_NODE_IDS = ("vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeIron")
#: Uncertainty below this is transparent in the overlay, so the anatomy shows through confident regions.
OVERLAY_FLOOR = 0.05
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

_ROLES = {"segmentation": "vtkMRMLSegmentationNode", "uncertainty": "vtkMRMLScalarVolumeNode", "summary": "vtkMRMLTableNode"}


@dataclass(frozen=True)
class EngineOutputs:
    """The checked results of one engine run.

    Attributes:
        caseId: The engine's case id.
        labels: ``(K, J, I)`` uint8 labelmap on the input grid.
        uncertainty: ``(K, J, I)`` float32 in 0..1 on the input grid.
        summary: The parsed ``summary.json``.
        directory: The engine's case folder.
        ijkToRas: ``(4, 4)`` IJK-to-RAS of the grid the outputs were checked against.
    """

    caseId: str
    labels: np.ndarray
    uncertainty: np.ndarray
    summary: dict
    directory: Path
    ijkToRas: np.ndarray


@dataclass
class OutputNodes:
    """Output nodes of one input (``None``: create a new one, or reuse the previous run's)."""

    segmentation: Optional["slicer.vtkMRMLSegmentationNode"] = None
    uncertainty: Optional["slicer.vtkMRMLScalarVolumeNode"] = None
    table: Optional["slicer.vtkMRMLTableNode"] = None

    def nodes(self) -> list:
        return [n for n in (self.segmentation, self.uncertainty, self.table) if n is not None]


def readVolumeFile(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(voxels (K, J, I), IJK-to-RAS (4, 4))`` of an image file, read through a storage node outside any scene.

    Raises:
        EngineError: the file is missing or unreadable.
    """
    if not Path(path).is_file():
        raise EngineError(f"the UML engine did not write {path}: see the log for the engine's messages")
    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise EngineError(f"could not read the engine output {path}: the file is damaged")
    return slicer.util.arrayFromVolume(node).copy(), ijkToRasArray(node)


def findCaseDirectory(outputDirectory: Path) -> Path:
    """The single case folder (``<outdir>/<case_id>/summary.json``) written by one engine run."""
    found = sorted(p.parent for p in Path(outputDirectory).glob("*/summary.json"))
    if len(found) != 1:
        raise EngineError(f"the UML engine wrote {len(found)} case folders with a summary.json into {outputDirectory}, expected 1")
    return found[0]


def _checkGrid(name: str, voxels: np.ndarray, matrix: np.ndarray, dims: Sequence[int], reference: np.ndarray) -> None:
    if tuple(reversed(voxels.shape[:3])) != tuple(dims) or voxels.ndim != 3:
        raise EngineError(f"the engine's {name} has {voxels.shape[::-1]} voxels but the input has {tuple(dims)}: report this engine bug")
    if not np.allclose(matrix, reference, rtol=1e-5, atol=GEOMETRY_TOLERANCE_MM):
        raise EngineError(f"the engine's {name} is not on the input grid (IJK-to-RAS differs): report this engine bug")


def readCaseOutputs(
    caseDirectory: Path,
    model: ModelInfo,
    outputFormat: str = "nrrd",
    dimensions: Optional[Sequence[int]] = None,
    ijkToRas: Optional[np.ndarray] = None,
) -> EngineOutputs:
    """Read and check one case folder of the engine against the input grid and the model.

    Args:
        caseDirectory: ``<outdir>/<case_id>``.
        model: The model (its segment labels are the only labels allowed in the labelmap).
        outputFormat: ``"nrrd"`` or ``"nii.gz"``.
        dimensions: ``(I, J, K)`` of the input, or ``None`` to take the segmentation's own grid as reference.
        ijkToRas: The input's ``(4, 4)`` IJK-to-RAS matrix (with ``dimensions``).

    Raises:
        EngineError: a missing or damaged file, a grid that differs from the input, unknown labels,
            uncertainty outside 0..1, or an invalid summary.
    """
    case = Path(caseDirectory)
    try:
        summary = json.loads((case / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"the engine's summary {case / 'summary.json'} is missing or not valid JSON ({exc})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("classification"), dict):
        raise EngineError(f"the engine's summary {case / 'summary.json'} has no classification section")
    labels, labelsMatrix = readVolumeFile(case / f"segmentation.{outputFormat}")
    uncertainty, uncMatrix = readVolumeFile(case / f"uncertainty.{outputFormat}")
    if dimensions is None or ijkToRas is None:
        dimensions, ijkToRas = tuple(reversed(labels.shape)), labelsMatrix
    _checkGrid("segmentation", labels, labelsMatrix, dimensions, ijkToRas)
    _checkGrid("uncertainty map", uncertainty, uncMatrix, dimensions, ijkToRas)
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels)):
        raise EngineError("the engine's segmentation holds non-integer labels: report this engine bug")
    allowed = {0} | {s.label for s in model.segments}
    present = set(int(v) for v in np.unique(labels))
    if not present <= allowed:
        raise EngineError(f"the engine's segmentation holds labels {sorted(present - allowed)} that model '{model.id}' does not declare")
    uncertainty = uncertainty.astype(np.float32, copy=False)
    if not np.all(np.isfinite(uncertainty)) or uncertainty.min(initial=0.0) < -1e-4 or uncertainty.max(initial=0.0) > 1.0 + 1e-4:
        raise EngineError("the engine's uncertainty map has values outside 0..1: report this engine bug")
    return EngineOutputs(
        caseId=str(summary.get("case_id", case.name)),
        labels=labels.astype(np.uint8),
        uncertainty=np.clip(uncertainty, 0.0, 1.0),
        summary=summary,
        directory=case,
        ijkToRas=np.asarray(ijkToRas, dtype=np.float64),
    )


def readEngineOutputs(outputDirectory: Path, model: ModelInfo, outputFormat: str = "nrrd", dimensions: Optional[Sequence[int]] = None, ijkToRas: Optional[np.ndarray] = None) -> EngineOutputs:
    """:func:`readCaseOutputs` of the single case folder of a one-case engine run."""
    return readCaseOutputs(findCaseDirectory(outputDirectory), model, outputFormat, dimensions, ijkToRas)


def segmentIdFor(segment: SegmentInfo) -> str:
    """Stable segment id, so re-runs replace the same segments (``UML_label_<label>``)."""
    return f"UML_label_{segment.label}"


def _code(entry: Optional[dict]) -> tuple[str, str, str]:
    """``(code, scheme, meaning)`` of a coded entry (empty strings when absent)."""
    if not entry:
        return ("", "", "")
    return (str(entry.get("code", "")), str(entry.get("scheme", "")), str(entry.get("meaning", "")))


def terminologyEntry(segment: SegmentInfo) -> str:
    """Slicer's serialised terminology entry for a segment, or ``""`` when the card gives no category and type.

    Keys used from the card: ``category``, ``type``, and optionally ``modifier`` (type modifier), ``region``
    (anatomic region) and ``region_modifier``.
    """
    t = segment.terminology
    if not t.get("category") or not t.get("type"):
        return ""
    cat, typ, mod = _code(t.get("category")), _code(t.get("type")), _code(t.get("modifier"))
    reg, regMod = _code(t.get("region")), _code(t.get("region_modifier"))
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT, *cat, *typ, *mod, ANATOMIC_CONTEXT if reg[0] else "", *reg, *regMod
    )


def setSegmentTerminology(segment, entry: str) -> None:
    """Set a segment's serialised terminology entry on every Slicer: ``SetTerminology`` exists from 5.10, before
    that (5.8) the entry is the segment tag named by ``GetTerminologyEntryTagName``."""
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(entry)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def _released(collection) -> list:
    """The items of a collection the caller owns (``GetNodesByClass``, ``GetNodesByName`` hand out a new one), which
    is then released, as ``slicer.util.getNodesByClass`` does, so no collection leaks per call."""
    try:
        return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    finally:
        collection.UnRegister(None)


def nodesByClass(scene, className: str) -> list:
    """The scene's nodes of a class."""
    return _released(scene.GetNodesByClass(className))


def nodesByName(scene, name: str) -> list:
    """The scene's nodes of a name."""
    return _released(scene.GetNodesByName(name))


def findPreviousOutputs(scene, inputNode) -> OutputNodes:
    """The output nodes an earlier run made for ``inputNode`` (by role attribute and input reference)."""
    found: dict[str, Any] = {}
    for role, className in _ROLES.items():
        for node in nodesByClass(scene, className):
            if node.GetAttribute(ROLE_ATTRIBUTE) == role and node.GetNodeReferenceID(INPUT_REFERENCE_ROLE) == inputNode.GetID():
                found[role] = node
                break
    return OutputNodes(found.get("segmentation"), found.get("uncertainty"), found.get("summary"))


def createMissingOutputs(scene, inputNode, requested: OutputNodes, created: Optional[list] = None) -> OutputNodes:
    """Fill the gaps of ``requested``: the previous run's node for this input, else a new node (appended to
    ``created``, so that a failed import can remove it)."""
    previous = findPreviousOutputs(scene, inputNode)
    base = inputNode.GetName()
    created = [] if created is None else created

    def node(given, className: str, suffix: str):
        if given is not None:
            return given
        new = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(f"{base} UML {suffix}"))
        created.append(new)
        return new

    seg = node(requested.segmentation or previous.segmentation, "vtkMRMLSegmentationNode", "segmentation")
    unc = node(requested.uncertainty or previous.uncertainty, "vtkMRMLScalarVolumeNode", "uncertainty")
    table = node(requested.table or previous.table, "vtkMRMLTableNode", "summary")
    for node, role in ((seg, "segmentation"), (unc, "uncertainty"), (table, "summary")):
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        node.SetNodeReferenceID(INPUT_REFERENCE_ROLE, inputNode.GetID())
    return OutputNodes(seg, unc, table)


def labelmapImage(mask: np.ndarray, referenceNode):
    """A vtkOrientedImageData of a binary mask on the reference grid. The caller owns it (as the header of
    ``CreateOrientedImageDataFromVolumeNode`` says): release it with ``UnRegister(None)`` once used."""
    holder = slicer.vtkMRMLLabelMapVolumeNode()
    m = vtk.vtkMatrix4x4()
    referenceNode.GetIJKToRASMatrix(m)
    holder.SetIJKToRASMatrix(m)
    slicer.util.updateVolumeFromArray(holder, mask.astype(np.uint8, copy=False))
    return slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(holder)


def _setSegment(segmentationNode, segmentId: str, name: str, color: Sequence[float], mask: np.ndarray, referenceNode, terminology: str) -> None:
    segmentation = segmentationNode.GetSegmentation()
    if segmentation.AddEmptySegment(segmentId, name, list(color)) != segmentId:
        raise EngineError(f"could not add the segment '{name}' to {segmentationNode.GetName()}: Slicer's Segmentations "
                          "module is not loaded; enable it (Application settings > Modules) and restart Slicer")
    if terminology:
        setSegmentTerminology(segmentation.GetSegment(segmentId), terminology)
    image = labelmapImage(mask, referenceNode)
    try:
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_REPLACE):
            raise EngineError(f"could not store segment '{name}' in {segmentationNode.GetName()}")
    finally:
        image.UnRegister(None)


def updateSegmentation(segmentationNode, referenceNode, labels: np.ndarray, model: ModelInfo, reviewMask: Optional[np.ndarray] = None) -> None:
    """Replace the node's segments by the model's segments (names, colours, terminology) from ``labels``.

    Args:
        segmentationNode: The output node (in a scene).
        referenceNode: The input volume: geometry source.
        labels: ``(K, J, I)`` labelmap.
        model: Segment names, colours and codes.
        reviewMask: Optional ``(K, J, I)`` boolean mask of high-uncertainty voxels for the "Review" segment.
    """
    wasModifying = segmentationNode.StartModify()
    try:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceNode)
        segmentationNode.GetSegmentation().RemoveAllSegments()
        for segment in model.segments:
            _setSegment(segmentationNode, segmentIdFor(segment), segment.name, segment.color, labels == segment.label, referenceNode, terminologyEntry(segment))
        if reviewMask is not None:
            _setSegment(segmentationNode, REVIEW_SEGMENT_ID, REVIEW_SEGMENT_NAME, REVIEW_SEGMENT_COLOR, reviewMask, referenceNode, "")
        if segmentationNode.GetScene() is not None and segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
    finally:
        segmentationNode.EndModify(wasModifying)


@dataclass
class StagedOutputs:
    """One run's segments built in a private scene (every conversion that can fail done), ready to be copied into
    the user's nodes by :meth:`commit`, so a failure while building leaves the user's scene untouched."""

    privateScene: Any
    segmentationNode: Any
    uncertainty: np.ndarray

    def commit(self, nodes: "OutputNodes", referenceNode, summary: dict) -> None:
        """Copy the staged segments, the uncertainty map and the summary into ``nodes`` (nodes of the user's scene)."""
        target = nodes.segmentation
        wasModifying = target.StartModify()
        try:
            target.GetSegmentation().DeepCopy(self.segmentationNode.GetSegmentation())
            if target.GetScene() is not None and target.GetDisplayNode() is None:
                target.CreateDefaultDisplayNodes()
        finally:
            target.EndModify(wasModifying)
        updateUncertaintyVolume(nodes.uncertainty, referenceNode, self.uncertainty)
        updateSummaryTable(nodes.table, summary)

    def close(self) -> None:
        self.privateScene.Clear(1)


def stageOutputs(outputs: "EngineOutputs", referenceNode, model: ModelInfo, reviewMask: Optional[np.ndarray]) -> StagedOutputs:
    """Build the segments of ``outputs`` (names, colours, terminology, Review segment) on ``referenceNode``'s grid
    in a private scene."""
    private = slicer.vtkMRMLScene()
    try:
        segmentation = private.AddNewNodeByClass("vtkMRMLSegmentationNode", outputs.caseId)
        updateSegmentation(segmentation, referenceNode, outputs.labels, model, reviewMask)
    except BaseException:
        private.Clear(1)
        raise
    return StagedOutputs(private, segmentation, outputs.uncertainty)


def updateUncertaintyVolume(volumeNode, referenceNode, uncertainty: np.ndarray) -> None:
    """Put the uncertainty map on the input grid (the input's exact IJK-to-RAS), heat colours, window 0..1."""
    m = vtk.vtkMatrix4x4()
    referenceNode.GetIJKToRASMatrix(m)
    volumeNode.SetIJKToRASMatrix(m)
    slicer.util.updateVolumeFromArray(volumeNode, uncertainty.astype(np.float32, copy=False))
    if volumeNode.GetScene() is None:
        return
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    display = volumeNode.GetDisplayNode()
    scene = volumeNode.GetScene()
    for colorId in HEAT_COLOR_NODE_IDS:
        if scene.GetNodeByID(colorId) is not None:
            display.SetAndObserveColorNodeID(colorId)
            break
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.AutoThresholdOff()
    display.SetLowerThreshold(OVERLAY_FLOOR)
    display.SetUpperThreshold(1.0)
    display.ApplyThresholdOn()


def updateSummaryTable(tableNode, summary: dict) -> None:
    """Fill the table with the flattened summary (columns ``Field``, ``Value``); the JSON is kept as attribute."""
    table = tableNode.GetTable()
    wasModifying = tableNode.StartModify()
    try:
        tableNode.RemoveAllColumns()
        rows = flattenSummary(summary)
        for name, values in ((FIELD_COLUMN, [r[0] for r in rows]), (VALUE_COLUMN, [r[1] for r in rows])):
            column = vtk.vtkStringArray()
            column.SetName(name)
            column.SetNumberOfValues(len(values))
            for i, v in enumerate(values):
                column.SetValue(i, v)
            table.AddColumn(column)
        tableNode.SetUseColumnNameAsColumnHeader(True)
        tableNode.SetAttribute(SUMMARY_ATTRIBUTE, json.dumps(summary))
        table.Modified()
    finally:
        tableNode.EndModify(wasModifying)


def summaryFromTable(tableNode) -> list[tuple[str, str]]:
    """The ``(field, value)`` rows of a summary table."""
    table = tableNode.GetTable()
    fields, values = table.GetColumnByName(FIELD_COLUMN), table.GetColumnByName(VALUE_COLUMN)
    if fields is None or values is None:
        return []
    return [(fields.GetValue(i), values.GetValue(i)) for i in range(table.GetNumberOfRows())]


def placeInStudy(scene, referenceNode, nodes: Iterable) -> None:
    """Put ``nodes`` beside the input in the subject hierarchy (under its study) and under its transform."""
    sh = scene.GetSubjectHierarchyNode()
    if sh is None:
        return
    inputItem = sh.GetItemByDataNode(referenceNode)
    parent = sh.GetItemParent(inputItem) if inputItem else sh.GetSceneItemID()
    transformId = referenceNode.GetTransformNodeID()
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:
            sh.CreateItem(parent, node)
        if hasattr(node, "SetAndObserveTransformNodeID"):
            node.SetAndObserveTransformNodeID(transformId)


def showOverlay(scene, backgroundNode, foregroundNode, opacity: float = 0.4) -> None:
    """Show ``foregroundNode`` over ``backgroundNode`` in every slice view of the scene."""
    for composite in nodesByClass(scene, "vtkMRMLSliceCompositeNode"):
        composite.SetBackgroundVolumeID(backgroundNode.GetID())
        composite.SetForegroundVolumeID(foregroundNode.GetID())
        composite.SetForegroundOpacity(float(opacity))


def writeSegmentationFile(segmentationNode, path: Path) -> Path:
    """Write a segmentation node as ``.seg.nrrd`` (names, colours and terminology travel with it)."""
    path = Path(path)
    if not path.name.endswith(".seg.nrrd"):
        raise ValueError(f"segmentation files must end with .seg.nrrd, got {path.name}")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(True)
    if not storage.WriteData(segmentationNode):
        raise EngineError(f"could not write {path}: check the folder is writable and has free space")
    return path


def writeVolumeFile(volumeNode, path: Path) -> Path:
    """Write a volume node (compressed NRRD or any format Slicer's archetype writer knows by extension)."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(True)
    if not storage.WriteData(volumeNode):
        raise EngineError(f"could not write {path}: check the folder is writable and has free space")
    return Path(path)
