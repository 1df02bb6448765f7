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
        channel: The model channel it feeds (``"pre"``, ``"early"``...), or ``"rgb"`` for a colour image.
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


def planInputs(inputNode, phaseNodes: Sequence = (), model: Optional[ModelInfo] = None) -> InputPlan:
    """Check the input node(s) against the model and decide which files the engine gets.

    Accepted: one grayscale volume (the engine replicates it into every channel), one grayscale volume per
    model channel on the same grid (``inputNode`` is the first channel, ``phaseNodes`` the others), a
    multi-frame volume with exactly one frame per channel, or an RGB(A) image for a colour model.

    Args:
        inputNode: The input volume node (its grid receives the outputs).
        phaseNodes: Further phase volumes in the model's channel order (``None`` entries are ignored).
        model: The model to check against.

    Returns:
        The :class:`InputPlan`.

    Raises:
        InputError: no or wrong node type, labelmap, empty image, RGB vs grayscale mismatch, wrong number of
            frames or phases, phases not on the input grid.
    """
    if model is None:
        raise InputError("no model given: pass model=<bundle folder or id>")
    components = _checkImageNode(inputNode, "input volume")
    phases = [n for n in phaseNodes if n is not None]
    channels = model.channels
    names = ", ".join(channels)
    case = caseNameFromNode(inputNode)
    colour = _isColour(inputNode, components)

    if model.isColour:
        if not colour:
            raise InputError(
                f"model '{model.name}' expects an RGB colour image, but the input {_describe(inputNode)} has "
                f"{components} grayscale component(s): load the colour image (e.g. fundus or dermoscopy photo)"
            )
        if phases:
            raise InputError(f"model '{model.name}' takes one colour image: clear the extra phase volumes")
        return InputPlan(case, inputNode, (PhaseSource(inputNode, None, "rgb"),))

    if colour:
        raise InputError(
            f"the input {_describe(inputNode)} is an RGB colour image, but model '{model.name}' expects grayscale "
            f"volumes ({names}): select a grayscale volume, or convert it with the 'Vector to Scalar Volume' module"
        )
    if components > 1:
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
        return InputPlan(case, inputNode, tuple(PhaseSource(inputNode, i, ch) for i, ch in enumerate(channels)))

    if phases and len(phases) + 1 != len(channels):
        raise InputError(
            f"{len(phases) + 1} volumes given, but model '{model.name}' expects 1 (replicated into every channel) "
            f"or {len(channels)} ({names}): select one volume per phase or only the input volume"
        )
    if not phases and model.minChannels > 1:
        raise InputError(f"model '{model.name}' needs at least {model.minChannels} phase volumes ({names}): select the other phases")
    sources = [PhaseSource(inputNode, None, channels[0])]
    for channel, node in zip(channels[1:], phases):
        role = f"'{channel}' phase volume"
        if _checkImageNode(node, role) != 1:
            raise InputError(f"the {role} {_describe(node)} has several components: select a single-frame grayscale volume")
        if node is inputNode or any(s.node is node for s in sources):
            raise InputError(f"the {role} {_describe(node)} is selected twice: select a different volume per phase")
        if not sameGrid(node, inputNode):
            raise InputError(
                f"the {role} {_describe(node)} is not on the input volume's grid (dimensions or position differ): "
                "resample it onto the input with the 'Resample Image (BRAINS)' or 'Crop Volume' module"
            )
        sources.append(PhaseSource(node, None, channel))
    return InputPlan(case, inputNode, tuple(sources))


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
