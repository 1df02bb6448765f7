"""``UMLSegmentationLib.paths``: where the module finds its engine, its models, its sample data and its Python."""

from __future__ import annotations

import sys

from UMLSegmentationLib.paths import (
    defaultPythonExecutable,
    moduleDirectory,
    runningInSlicerApplication,
    sampleDataDirectory,
    shippedModelDirectories,
    umlcorePythonPath,
)

from .umlslicer_helpers import REPO


def test_the_engine_and_module_paths():
    assert (umlcorePythonPath() / "umlcore" / "__main__.py").is_file()
    assert (moduleDirectory() / "UMLSegmentation.py").is_file()


def test_the_source_tree_layout():
    """From the source tree: the engine beside the module, the shipped models and the sample data in the repository."""
    assert moduleDirectory() == REPO / "UMLSegmentation"
    assert umlcorePythonPath() == REPO / "UMLCore"
    assert shippedModelDirectories() == [REPO / "Resources" / "Models"]
    assert sampleDataDirectory() == REPO / "UMLSegmentation" / "Resources" / "SampleData"
    assert not runningInSlicerApplication() and defaultPythonExecutable() == sys.executable  # slicer-core: no app
