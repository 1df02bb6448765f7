"""Checking the input volume node(s) against a model and writing them for the engine.

All checks run before anything is written or started, and every refusal is one :class:`InputError` that
names the problem and the fix. Inputs are only read: nodes are written to the temporary folder through a
storage node that is not added to the scene, so the scene and the nodes stay untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import vtk

import slicer

from .errors import InputError
from .models import ModelInfo

__all__ = [
    "GEOMETRY_TOLERANCE_MM",
    "PhaseSource",
    "InputPlan",
    "ijkToRasArray",
    "volumeDimensions",
    "sameGrid",
    "slicesAlong",
    "caseNameFromNode",
    "planInputs",
    "writeInputs",
]

#: Largest difference (mm, or unitless for direction cosines) between two grids that still counts as "same grid".
GEOMETRY_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class PhaseSource:
    """One engine input file: a volume node, or one component (frame) of a multi-component node.

    Attributes:
        node: The source node.
        component: Component index to extract, or ``None`` to write the node as it is.
        channel: The model channel it feeds (``"pre"``, ``"early"``...), or ``"rgb"`` / ``"grey"`` for a picture
            (the engine splits a colour picture into its channels).
    """

    node: "slicer.vtkMRMLScalarVolumeNode"
    component: Optional[int]
    channel: str


@dataclass(frozen=True)
class InputPlan:
    """What will be sent to the engine for one case.

    Attributes:
        caseName: File-name-safe case id (the engine names its output folder after the first file).
        referenceNode: The input node: outputs are placed on its grid, under its study and its transform.
        sources: One :class:`PhaseSource` per engine input file, in channel order.
    """

    caseName: str
    referenceNode: "slicer.vtkMRMLScalarVolumeNode"
    sources: tuple[PhaseSource, ...]


def ijkToRasArray(node) -> np.ndarray:
    """The node's IJK-to-RAS matrix as a ``(4, 4)`` float64 array."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def volumeDimensions(node) -> tuple[int, int, int]:
    """``(I, J, K)`` voxel counts of a volume node's image data (``(0, 0, 0)`` without image data)."""
    image = node.GetImageData() if node is not None else None
    if image is None:
        return (0, 0, 0)
    return tuple(int(v) for v in image.GetDimensions())  # type: ignore[return-value]


def sameGrid(a, b, tolerance: float = GEOMETRY_TOLERANCE_MM) -> bool:
    """True when two volume nodes have the same dimensions and (within ``tolerance``) the same IJK-to-RAS."""
    if volumeDimensions(a) != volumeDimensions(b):
        return False
    return bool(np.allclose(ijkToRasArray(a), ijkToRasArray(b), rtol=0.0, atol=tolerance))


def caseNameFromNode(node) -> str:
    """A file-name-safe case id from the node name (letters, digits, ``-`` and ``_``)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", node.GetName() or "").strip("_-")
    return name[:64] or "case"


def _describe(node) -> str:
    return f"'{node.GetName()}' ({node.GetClassName()})"


def _checkImageNode(node, role: str) -> int:
    """Common checks of an image node; returns its number of scalar components."""
    if node is None:
        raise InputError(f"no {role} given: select a volume for '{role}' (or pass a vtkMRMLScalarVolumeNode)")
    if not hasattr(node, "IsA") or not node.IsA("vtkMRMLScalarVolumeNode"):
        kind = node.GetClassName() if hasattr(node, "GetClassName") else type(node).__name__
        raise InputError(f"the {role} is a {kind}, not an image volume: select a scalar volume node")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"the {role} {_describe(node)} is a labelmap, not an image: select the image volume it was drawn on")
    dims = volumeDimensions(node)
    if min(dims) < 1:
        raise InputError(f"the {role} {_describe(node)} holds no voxels: load the image data first")
    return int(node.GetImageData().GetNumberOfScalarComponents())


def _isColour(node, components: int) -> bool:
    return components in (3, 4) and node.GetImageData().GetScalarType() == vtk.VTK_UNSIGNED_CHAR


#: Patient axis (RAS row of the IJK-to-RAS matrix) of each slicing axis.
_PATIENT_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


def slicesAlong(node, slicingAxis: str = "axial") -> int:
    """How many slices the engine cuts a volume node into along a model's slicing axis: the voxel count along the
    index axis closest to that patient axis (umlcore's ``slice_axis_index``; the first on ties)."""
    m = ijkToRasArray(node)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    direction = m / np.where(norms > 0, norms, 1.0)
    axis = int(np.argmax(np.abs(direction[_PATIENT_AXIS[slicingAxis]])))
    return volumeDimensions(node)[axis]


def _keptColours(components: int) -> int:
    """The colours the engine keeps of a picture's components: an alpha channel is dropped (2 -> 1, 4 -> 3)."""
    return {2: 1, 4: 3}.get(components, components)


def planInputs(inputNode, phaseNodes: Sequence = (), model: Optional[ModelInfo] = None) -> InputPlan:
    """Check the input node(s) against the model and decide which files the engine gets.

    Accepted for a volume model: one grayscale volume (the engine replicates it into every channel), one grayscale
    volume per model channel on the same grid (``inputNode`` is the first channel, ``phaseNodes`` the others), or
    a multi-frame volume with exactly one frame per channel. For a picture model (card ``input.kind`` picture):
    one picture, i.e. a single-slice volume, a vector volume for colour (RGB; RGBA with the alpha dropped) or a
    scalar volume for grey (replicated into every channel when the card allows one channel).

    Args:
        inputNode: The input volume node (its grid receives the outputs).
        phaseNodes: Further phase volumes in the model's channel order (``None`` entries are ignored).
        model: The model to check against.

    Returns:
        The :class:`InputPlan`.

    Raises:
        InputError: no or wrong node type, labelmap, empty image, a picture for a volume model or a volume for a
            picture model, RGB vs grayscale mismatch, wrong number of frames, colours or phases, phases not on
            the input grid.
    """
    if model is None:
        raise InputError("no model given: pass model=<bundle folder or id>")
    components = _checkImageNode(inputNode, "input volume")
    phases = [n for n in phaseNodes if n is not None]
    if model.isPicture:
        return _planPicture(inputNode, components, phases, model)
    return _planVolume(inputNode, components, phases, model)


def _planPicture(inputNode, components: int, phases: list, model: ModelInfo) -> InputPlan:
    """One picture for a picture model, written as it is (the engine splits a vector volume into its colours)."""
    names = ", ".join(model.channels)
    if phases:
        raise InputError(f"model '{model.name}' reads one picture ({names}): clear the extra phase volumes")
    slices = slicesAlong(inputNode, model.slicingAxis)
    if slices > 1:
        size = "x".join(str(v) for v in volumeDimensions(inputNode))
        raise InputError(
            f"the input {_describe(inputNode)} is a 3D volume of {size} voxels ({slices} slices), but model "
            f"'{model.name}' reads 2D pictures ({names}): load a picture (PNG, JPEG, BMP, TIFF), or pick a model "
            "made for volumes"
        )
    colours, accepted = _keptColours(components), model.acceptedChannelCounts
    if colours not in accepted:
        ways = " or ".join("1 (grey)" if n == 1 else f"{n} ({names})" for n in accepted)
        fixes = ["a grey picture" if n == 1 else "an RGB picture" if n == 3 else f"a picture of {n} colours" for n in accepted]
        raise InputError(
            f"the input {_describe(inputNode)} is a picture of {components} component(s), but model '{model.name}' "
            f"reads pictures of {ways} colour(s): load {' or '.join(reversed(fixes))}"
        )
    channel = "grey" if colours == 1 else "rgb"
    return InputPlan(caseNameFromNode(inputNode), inputNode, (PhaseSource(inputNode, None, channel),))


def _planVolume(inputNode, components: int, phases: list, model: ModelInfo) -> InputPlan:
    """The volume(s) for a volume model: one, one per channel, or one multi-frame volume."""
    channels = model.channels
    names = ", ".join(channels)
    if _isColour(inputNode, components):
        raise InputError(
            f"the input {_describe(inputNode)} is an RGB colour image, but model '{model.name}' expects grayscale "
            f"volumes ({names}): pick a model made for pictures, or convert it with the 'Vector to Scalar Volume' module"
        )
    if slicesAlong(inputNode, model.slicingAxis) == 1:
        raise InputError(
            f"the input {_describe(inputNode)} is a single slice (a 2D picture), but model '{model.name}' reads 3D "
            f"volumes ({names}): load the whole volume, or pick a model made for pictures"
        )
    if components > 1:
        return _planFrames(inputNode, components, phases, model)
    if phases and len(phases) + 1 != len(channels):
        raise InputError(
            f"{len(phases) + 1} volumes given, but model '{model.name}' expects 1 (replicated into every channel) "
            f"or {len(channels)} ({names}): select one volume per phase or only the input volume"
        )
    if not phases and model.minChannels > 1:
        raise InputError(f"model '{model.name}' needs at least {model.minChannels} phase volumes ({names}): select the other phases")
    sources = [PhaseSource(inputNode, None, channels[0])]
    for channel, node in zip(channels[1:], phases):
        _checkPhase(node, f"'{channel}' phase volume", inputNode, sources)
        sources.append(PhaseSource(node, None, channel))
    return InputPlan(caseNameFromNode(inputNode), inputNode, tuple(sources))


def _planFrames(inputNode, components: int, phases: list, model: ModelInfo) -> InputPlan:
    """A multi-frame volume with one frame per channel (each frame becomes one engine input file)."""
    channels = model.channels
    names = ", ".join(channels)
    if phases:
        raise InputError(
            f"the input {_describe(inputNode)} already has {components} frames: give either one multi-frame "
            "volume or separate phase volumes, not both"
        )
    if components != len(channels):
        raise InputError(
            f"the input {_describe(inputNode)} is 4D with {components} frames, but model '{model.name}' expects "
            f"{len(channels)} phases ({names}): extract the {names} frames (Sequences module) and select them "
            "as separate phase volumes"
        )
    sources = tuple(PhaseSource(inputNode, i, ch) for i, ch in enumerate(channels))
    return InputPlan(caseNameFromNode(inputNode), inputNode, sources)


def _checkPhase(node, role: str, inputNode, sources: Sequence[PhaseSource]) -> None:
    """A further phase volume: single-frame, not selected twice, on the input's grid."""
    if _checkImageNode(node, role) != 1:
        raise InputError(f"the {role} {_describe(node)} has several components: select a single-frame grayscale volume")
    if node is inputNode or any(s.node is node for s in sources):
        raise InputError(f"the {role} {_describe(node)} is selected twice: select a different volume per phase")
    if not sameGrid(node, inputNode):
        raise InputError(
            f"the {role} {_describe(node)} is not on the input volume's grid (dimensions or position differ): "
            "resample it onto the input with the 'Resample Image (BRAINS)' or 'Crop Volume' module"
        )


def _writeNode(node, path: Path) -> None:
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    if not storage.WriteData(node):
        raise InputError(f"could not write the input volume {_describe(node)} to {path}: check free disk space")


def _componentNode(node, component: int):
    extract = vtk.vtkImageExtractComponents()
    extract.SetInputData(node.GetImageData())
    extract.SetComponents(component)
    extract.Update()
    out = slicer.vtkMRMLScalarVolumeNode()
    out.SetName(f"{node.GetName()}_{component}")
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    out.SetIJKToRASMatrix(m)
    image = vtk.vtkImageData()
    image.DeepCopy(extract.GetOutput())
    out.SetAndObserveImageData(image)
    return out


def writeInputs(plan: InputPlan, directory: Path) -> list[Path]:
    """Write the plan's sources as uncompressed NRRD files into ``directory``; returns them in channel order.

    The first file is ``<caseName>.nrrd`` (the engine derives the case id from it), the others
    ``<caseName>_<channel>.nrrd``. Nodes are written through a storage node outside the scene.
    """
    paths: list[Path] = []
    for index, source in enumerate(plan.sources):
        safeChannel = re.sub(r"[^A-Za-z0-9_-]+", "_", source.channel) or str(index)
        name = f"{plan.caseName}.nrrd" if index == 0 else f"{plan.caseName}_{index}_{safeChannel}.nrrd"
        path = Path(directory) / name
        node = source.node if source.component is None else _componentNode(source.node, source.component)
        _writeNode(node, path)
        paths.append(path)
    return paths
