"""Helpers of the Slicer-side tests (``conftest.py`` imports them once ``slicer-core`` is known to be installed)."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import numpy as np

import slicer

REPO = Path(__file__).resolve().parents[2]

LOGICS = (
    ("Colors", "vtkSlicerColorLogic"),
    ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    ("Volumes", "vtkSlicerVolumesLogic"),
    ("Terminologies", "vtkSlicerTerminologiesModuleLogic"),
    ("Tables", "vtkSlicerTablesLogic"),
)

# A lesion segment coded as in DICOM (SCT): category "Morphologically altered structure", type "Neoplasm",
# region "Breast".
LESION_TERMINOLOGY = {
    "category": {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure"},
    "type": {"scheme": "SCT", "code": "108369006", "meaning": "Neoplasm"},
    "region": {"scheme": "SCT", "code": "76752008", "meaning": "Breast"},
}
LESION_COLOR = (0.85, 0.2, 0.25)

# An oblique, anisotropic grid (a transposed or LPS/RAS-flipped output would not match it).
IJK_TO_RAS = np.array([
    [0.0, 0.75, 0.0, -12.5],
    [-0.8, 0.0, 0.0, 30.25],
    [0.0, 0.0, 2.5, -7.0],
    [0.0, 0.0, 0.0, 1.0],
])
SHAPE_KJI = (6, 32, 40)

# A picture's grid as Slicer loads a PNG (LPS -> RAS: i and j flipped), with a pixel size and an in-plane rotation
# (a picture whose outputs came back flipped, transposed or shifted would not match it); one slice along S.
_TURN = np.deg2rad(20.0)
PICTURE_IJK_TO_RAS = np.array([
    [-0.5 * np.cos(_TURN), 0.6 * np.sin(_TURN), 0.0, 10.0],
    [-0.5 * np.sin(_TURN), -0.6 * np.cos(_TURN), 0.0, -20.0],
    [0.0, 0.0, 1.0, 3.0],
    [0.0, 0.0, 0.0, 1.0],
])
PICTURE_SHAPE = (40, 48)  # rows, columns


class MRML:
    """A scene with the module logics registered; ``count(cls)`` counts the nodes of a class."""

    def __init__(self) -> None:
        self.scene = slicer.vtkMRMLScene()
        self.app = slicer.vtkSlicerApplicationLogic()
        self.app.SetMRMLScene(self.scene)
        self.logics = {}
        for name, className in LOGICS:
            logic = getattr(slicer, className)()
            logic.SetMRMLApplicationLogic(self.app)
            logic.SetMRMLScene(self.scene)
            self.app.SetModuleLogic(name, logic)
            self.logics[name] = logic

    def count(self, className: str = "vtkMRMLNode") -> int:
        return self.scene.GetNodesByClass(className).GetNumberOfItems()

    def close(self) -> None:
        for logic in self.logics.values():
            logic.SetMRMLScene(None)
        self.scene.Clear(1)


def make_card(model_id: str = "uml-test-small", channels=("pre", "early", "late"), name: str = "UML test model", **input_options):
    """``(ModelCard, UMLConfig)`` of a small test model with one coded "Lesion" segment; ``input_options`` go to
    the card's ``InputSpec`` (e.g. ``kind="picture", target_size=(32, 32)``)."""
    from umlcore.card import InputSpec, ModelCard, Segment
    from umlcore.config import UMLConfig

    config = UMLConfig.preset("small", in_channels=len(channels))
    picture = input_options.get("kind") == "picture"
    card = ModelCard(
        id=model_id,
        version="0.0.1",
        name=name,
        task=("skin lesion picture: melanoma classification + lesion segmentation (untrained, for tests)" if picture
              else "breast DCE-MRI: pCR classification + lesion segmentation (untrained, for tests)"),
        classes=("no pCR", "pCR"),
        segments=(Segment(label=1, name="Lesion", color=LESION_COLOR, terminology=LESION_TERMINOLOGY),),
        input=InputSpec(channels=tuple(channels), **input_options),
        architecture=config,
        review_uncertainty=0.3,
    )
    return card, config


def sealed(card: dict) -> dict:
    """``card`` (a ``model.json`` object) with ``weights.card_sha256`` set as umlcore's exporter seals it."""
    from umlcore.card import card_digest

    return {**card, "weights": {**card.get("weights", {}), "card_sha256": card_digest(card)}}


def phantom(seed: int = 0, shape=SHAPE_KJI, enhancement: float = 1.0) -> np.ndarray:
    """A small int16 'breast' phantom with a bright blob (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    _, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    blob = ((j - shape[1] / 2) ** 2 + (i - shape[2] / 2) ** 2 < 40).astype(np.float32)
    body = 200 + 20 * rng.standard_normal(shape)
    return (body + enhancement * 600 * blob).astype(np.int16)


def picture(seed: int = 0, shape=PICTURE_SHAPE, colour: bool = True) -> np.ndarray:
    """A small uint8 'skin' picture with a dark disc, as Slicer holds it: ``(1, rows, columns, 3)`` for RGB,
    ``(1, rows, columns)`` for grey (every colour varies: the engine refuses a constant one)."""
    rng = np.random.default_rng(seed)
    j, i = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    disc = ((j - shape[0] / 2) ** 2 + (i - shape[1] / 2) ** 2 < (min(shape) / 4) ** 2).astype(np.float32)
    skin = np.array([200.0, 160.0, 140.0]) - np.array([120.0, 110.0, 100.0]) * disc[..., None]
    rgb = np.clip(skin + 10 * rng.standard_normal(skin.shape), 0, 255).astype(np.uint8)[None]
    return rgb if colour else rgb.mean(axis=-1).astype(np.uint8)


def add_volume(name: str = "MRBreast", array=None, ijk_to_ras=IJK_TO_RAS, node_class: str = "vtkMRMLScalarVolumeNode"):
    """A volume node in ``slicer.mrmlScene`` (default: the phantom on the oblique grid)."""
    return slicer.util.addVolumeFromArray(phantom() if array is None else array, ijk_to_ras, name=name, nodeClassName=node_class)


def scene_node_ids(scene) -> list[str]:
    """The IDs of every node of ``scene``, sorted (equal before and after: nothing was added or removed)."""
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def segment_array(mrml: MRML, segmentation_node, segment_id: str, reference) -> np.ndarray:
    """A segment's voxels on the reference grid (exported through the Segmentations logic)."""
    import vtk

    labelmap = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert mrml.logics["Segmentations"].ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference)
    array = slicer.util.arrayFromVolume(labelmap).copy()
    mrml.scene.RemoveNode(labelmap)
    return array


def read_segmentation_file(path: Path):
    """``(vtkSegmentation, segment names in order)`` of a ``.seg.nrrd`` file (it must read)."""
    node = slicer.vtkMRMLSegmentationNode()
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), path
    segmentation = node.GetSegmentation()
    return segmentation, [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def write_case(path: Path, seed: int, spacing=(0.8, 0.75, 2.5), origin=(10.0, -20.0, 5.0)):
    """The phantom of ``seed`` written as an image file (for folder mode); returns the SimpleITK image."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(phantom(seed).astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return image


def alive(pid: int) -> bool:
    """True while process ``pid`` runs (Linux: a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def third_party_imports(folder: Path) -> set[str]:
    """Third-party modules imported at module level by the ``.py`` files under ``folder`` (imports inside
    functions are optional extras; ``umlcore`` itself is left out)."""
    names = set()
    for path in folder.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body] + [c for n in tree.body if isinstance(n, (ast.Try, ast.If)) for c in ast.walk(n)]
        for node in top:
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "umlcore"}
