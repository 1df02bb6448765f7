"""What breaks the module in the real 3D Slicer but not under ``slicer-core`` by default: the segment API of
Slicer 5.8, objects the caller must release, and an import that fails halfway."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import vtk

import slicer
from UMLSegmentationLib import outputs
from UMLSegmentationLib.errors import EngineError
from UMLSegmentationLib.logic import UMLSegmentationLogic
from UMLSegmentationLib.outputs import (findPreviousOutputs, nodesByClass, nodesByName, setSegmentTerminology,
                                        summaryFromTable)

from .umlslicer_helpers import scene_node_ids


class Segment58:
    """``vtkSegment`` as Slicer 5.8 has it: no ``SetTerminology``, the entry is a tag."""

    def __init__(self, segment) -> None:
        self._segment = segment

    def SetTag(self, name, value):
        return self._segment.SetTag(name, value)

    def GetTerminologyEntryTagName(self):
        return self._segment.GetTerminologyEntryTagName()


def test_segment_terminology_is_set_on_slicer_5_8_and_on_5_10():
    entry = "Segmentation category and type - DICOM master list~SCT^49755003^Morph~SCT^108369006^Neoplasm~^^~~^^~^^"
    old, new = slicer.vtkSegment(), slicer.vtkSegment()
    assert not hasattr(Segment58(old), "SetTerminology")
    setSegmentTerminology(Segment58(old), entry)
    setSegmentTerminology(new, entry)
    tag = old.GetTerminologyEntryTagName()

    def read(segment) -> str:
        out = vtk.reference("")
        assert segment.GetTag(tag, out)
        return str(out)

    assert read(old) == entry == read(new) == new.GetTerminology() == old.GetTerminology()


class CountingScene:
    """A scene whose ``GetNodesByClass`` collections are kept, to read their reference counts afterwards."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self.collections = []

    def GetNodesByClass(self, className):
        collection = self.scene.GetNodesByClass(className)
        self.collections.append(collection)
        return collection

    def GetNodesByName(self, name):
        collection = self.scene.GetNodesByName(name)
        self.collections.append(collection)
        return collection


def test_node_collections_and_labelmap_images_are_released(mrml, volume, monkeypatch):
    counting = CountingScene(mrml.scene)
    assert nodesByClass(counting, "vtkMRMLScalarVolumeNode") == [volume]
    findPreviousOutputs(counting, volume)
    assert nodesByName(counting, volume.GetName()) == [volume]
    assert len(counting.collections) == 5
    assert [c.GetReferenceCount() for c in counting.collections] == [1] * 5  # only this test's Python references

    deleted, made = [], []
    create = outputs.labelmapImage

    def watched(mask, reference):
        image = create(mask, reference)
        image.AddObserver("DeleteEvent", lambda caller, event: deleted.append(1))
        made.append(1)
        return image

    monkeypatch.setattr(outputs, "labelmapImage", watched)
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
    labels[2:4, 5:9, 6:12] = 1
    from UMLSegmentationLib.models import ModelInfo, SegmentInfo

    model = ModelInfo(path=None, id="m", version="1", name="m", task="t", classes=("a", "b"),
                      segments=(SegmentInfo(1, "Lesion", (1.0, 0.0, 0.0)),), channels=("pre",))
    outputs.updateSegmentation(segmentation, volume, labels, model, reviewMask=labels > 0)
    gc.collect()
    assert len(made) == 2 and len(deleted) == 2  # one image a segment, each freed once stored


def test_a_failed_import_removes_the_new_nodes_and_keeps_the_previous_results(mrml, volume, bundle_dir, tmp_path, monkeypatch):
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")
    before = scene_node_ids(mrml.scene)

    def broken(*args, **kwargs):  # what Slicer 5.8 raised at the last step of every run
        raise AttributeError("'vtkSegment' object has no attribute 'SetTerminology'")

    with monkeypatch.context() as m:
        m.setattr(outputs.StagedOutputs, "commit", broken)
        with pytest.raises(EngineError, match=r"could not load the results into the scene \(AttributeError: .*SetTerminology.*\); the scene was left as it was"):
            logic.process(volume, model=bundle_dir, device="cpu")
    assert scene_node_ids(mrml.scene) == before and list((tmp_path / "tmp").glob("UML-*")) == []

    result = logic.process(volume, model=bundle_dir, device="cpu", reviewThreshold=0.5)
    rows = summaryFromTable(result.tableNode)
    segments = result.segmentationNode.GetSegmentation().GetNumberOfSegments()
    after = scene_node_ids(mrml.scene)
    with monkeypatch.context() as m:  # a re-run that fails while building keeps the previous run's nodes as they were
        m.setattr(outputs, "updateSegmentation", broken)
        with pytest.raises(EngineError, match="could not load the results"):
            logic.process(volume, model=bundle_dir, device="cpu")
    assert scene_node_ids(mrml.scene) == after
    assert summaryFromTable(result.tableNode) == rows
    assert result.segmentationNode.GetSegmentation().GetNumberOfSegments() == segments == 2


def test_add_model_validates_in_an_installed_extension_where_slicer_cannot_import_umlcore(bundle_dir, tmp_path):
    """An installed extension puts umlcore on the engine's PYTHONPATH only: Slicer's own Python cannot import it.
    ``validateModel`` (Add model from file...) must check the bundle anyway, through the engine."""
    import shutil
    import subprocess
    import sys
    import textwrap

    from .umlslicer_helpers import REPO

    tampered = tmp_path / "tampered"
    shutil.copytree(bundle_dir, tampered)
    data = bytearray((tampered / "model.safetensors").read_bytes())
    data[100] ^= 0x01
    (tampered / "model.safetensors").write_bytes(bytes(data))
    script = textwrap.dedent("""
        import importlib.abc, sys
        class NoUmlcore(importlib.abc.MetaPathFinder):  # as in Slicer: umlcore is not on sys.path
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "umlcore":
                    raise ModuleNotFoundError(f"No module named {name!r}")
        sys.meta_path.insert(0, NoUmlcore())
        from UMLSegmentationLib.errors import InputError
        from UMLSegmentationLib.models import validateModel
        print(validateModel(sys.argv[1]).id)
        try:
            validateModel(sys.argv[2])
        except InputError as exc:
            print("refused:", exc)
        assert not any(m.split(".")[0] == "umlcore" for m in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(bundle_dir), str(tampered)], capture_output=True, text=True,
                          cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(REPO / "UMLSegmentation")},
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "uml-test-small" and lines[1].startswith("refused:") and "does not match the sha256" in lines[1]


def test_the_module_file_never_imports_umlcore():
    """Slicer's "Reload and Test" runs the module file's self-test in Slicer's Python, which has no umlcore."""
    from .umlslicer_helpers import REPO, third_party_imports

    assert "umlcore" not in third_party_imports(REPO / "UMLSegmentation")
