"""Bundles trained and exported by the training tools on each --data kind run in the module's logic as they are:
the input file loaded as Slicer holds it (a volume, or a picture as a single-slice vector volume) -> ``process``."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import slicer
from UMLSegmentationLib.logic import UMLSegmentationLogic
from umlcore.bundle import load_bundle

from ..training.layouts import KINDS, first_test_input
from .umlslicer_helpers import add_volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def node_from_file(path, name: str):
    """The image file as a volume node, as Slicer loads it: its voxels and its IJK-to-RAS (a 2D picture is one slice,
    its colours the components of a vector volume)."""
    image = sitk.ReadImage(str(path))
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    array = sitk.GetArrayFromImage(image)  # (k, j, i) or (k, j, i, components)
    direction = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = LPS_TO_RAS @ direction
    ijk_to_ras[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin())
    vector = image.GetNumberOfComponentsPerPixel() > 1
    return add_volume(name, array, ijk_to_ras, node_class="vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode")


@pytest.mark.parametrize("name", list(KINDS))
def test_a_trained_bundle_runs_in_the_logic_on_its_datasets_input(name, trained_run, mrml, tmp_path):
    kind, root, run, bundle = trained_run(name)
    nodes = [node_from_file(path, f"input {i}") for i, path in enumerate(first_test_input(kind, root, run))]
    card = load_bundle(bundle).card
    result = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp").process(
        nodes[0], model=bundle, phaseNodes=nodes[1:], device="cpu")
    assert result.summary["classification"]["classes"] == list(card.classes)
    segments = result.segmentationNode.GetSegmentation()
    names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
    assert [s.name for s in card.segments] == names[:len(card.segments)]
    assert result.uncertaintyVolumeNode.GetImageData().GetDimensions() == nodes[0].GetImageData().GetDimensions()
    uncertainty = slicer.util.arrayFromVolume(result.uncertaintyVolumeNode)
    assert 0.0 <= uncertainty.min() and uncertainty.max() <= 1.0
