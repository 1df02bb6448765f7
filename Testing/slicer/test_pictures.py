"""2D pictures in Slicer: a picture model (card ``input.kind`` picture) run on what Slicer loads from a PNG / JPEG, a
single-slice vector volume (RGB) or scalar volume (grey), through ``process``, ``startRun`` / ``finishRun`` (the
widget's path) and ``processFolder`` on picture files; and the mismatches (a 3D volume for a picture model, a
picture for a volume model) refused before any engine starts."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import time

import numpy as np
import pytest
import SimpleITK as sitk

import slicer
from UMLSegmentationLib.errors import InputError
from UMLSegmentationLib.inputs import ijkToRasArray, planInputs, volumeDimensions, writeInputs
from UMLSegmentationLib.logic import RESULTS_CSV, UMLSegmentationLogic
from UMLSegmentationLib.models import readModelInfo
from UMLSegmentationLib.outputs import REVIEW_SEGMENT_ID, SUMMARY_ATTRIBUTE, summaryFromTable
from UMLSegmentationLib.summary import confidencePanel, flattenSummary

from .umlslicer_helpers import (
    LESION_COLOR,
    LESION_TERMINOLOGY,
    PICTURE_IJK_TO_RAS,
    PICTURE_SHAPE,
    add_volume,
    picture,
    read_segmentation_file,
    sealed,
    segment_array,
)


@pytest.fixture
def photo(mrml):
    """A colour picture as Slicer loads a PNG: a single-slice vtkMRMLVectorVolumeNode (uint8 RGB), in a study."""
    node = add_volume("Skin photo", picture(), PICTURE_IJK_TO_RAS, node_class="vtkMRMLVectorVolumeNode")
    sh = mrml.scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1"), "Study 1")
    sh.CreateItem(study, node)
    return node


def _engine_uncertainty(node, model_dir, folder):
    """The engine's own uncertainty (umlcore in process) for the file the module writes for ``node``."""
    from umlcore.bundle import load_bundle
    from umlcore.io import read_case
    from umlcore.predictor import Predictor

    files = writeInputs(planInputs(node, (), readModelInfo(model_dir)), folder)
    volumes = read_case(files)
    assert [v.GetSize() for v in volumes] == [(PICTURE_SHAPE[1], PICTURE_SHAPE[0], 1)] * 3  # red, green, blue
    return sitk.GetArrayFromImage(Predictor(load_bundle(model_dir), device="cpu").predict(volumes).uncertainty)


def test_a_colour_picture_gives_segments_uncertainty_and_the_summary_on_its_grid(mrml, photo, picture_model_dir, tmp_path):
    original = slicer.util.arrayFromVolume(photo).copy()
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")

    result = logic.process(photo, model=picture_model_dir, device="cpu", reviewThreshold=0.5)

    # segmentation on the picture's grid: the card's segment (name, colour, terminology) + the Review segment
    seg = result.segmentationNode.GetSegmentation()
    assert [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())] == ["UML_label_1", REVIEW_SEGMENT_ID]
    lesion = seg.GetSegment("UML_label_1")
    assert lesion.GetName() == "Lesion" and lesion.GetColor() == pytest.approx(LESION_COLOR)
    assert LESION_TERMINOLOGY["type"]["code"] in lesion.GetTerminology()
    # uncertainty: exactly the picture's grid (one slice), float32 in 0..1, the engine's own numbers
    unc = result.uncertaintyVolumeNode
    assert volumeDimensions(unc) == volumeDimensions(photo) == (PICTURE_SHAPE[1], PICTURE_SHAPE[0], 1)
    assert np.array_equal(ijkToRasArray(unc), PICTURE_IJK_TO_RAS)
    u = slicer.util.arrayFromVolume(unc)
    assert u.dtype == np.float32 and 0.0 <= u.min() and u.max() <= 1.0 and u.std() > 0
    assert np.allclose(u, _engine_uncertainty(photo, picture_model_dir, tmp_path), atol=1e-5)
    lesion_pixels = segment_array(mrml, result.segmentationNode, "UML_label_1", photo)
    assert lesion_pixels.shape == (1,) + PICTURE_SHAPE
    assert int(lesion_pixels.sum()) == result.summary["segments"][0]["voxel_count"]
    review = segment_array(mrml, result.segmentationNode, REVIEW_SEGMENT_ID, photo)
    assert np.array_equal(review > 0, u > 0.5) and review.any()

    # the summary: table rows, its inputs name the node (one entry per colour), the Confidence panel's content
    summary = result.summary
    assert summaryFromTable(result.tableNode) == flattenSummary(summary)
    assert json.loads(result.tableNode.GetAttribute(SUMMARY_ATTRIBUTE)) == summary
    assert [(e["channel"], e["volume"], e["node_name"], e["node_id"]) for e in summary["inputs"]] == [
        (c, i, "Skin photo", photo.GetID()) for i, c in enumerate(("red", "green", "blue"))]
    assert all("path" not in e for e in summary["inputs"])
    assert summary["geometry"]["size"] == [PICTURE_SHAPE[1], PICTURE_SHAPE[0], 1] and summary["slicing"]["count"] == 1
    panel = confidencePanel(summary)
    assert panel.picture and not panel.singleVolume and panel.singleInputText == ""
    assert panel.lesionSizeText == f"{int(lesion_pixels.sum())} pixel{'' if lesion_pixels.sum() == 1 else 's'} (Lesion)"
    assert panel.verdict in ("reliable", "review")

    # beside the picture in its study; the picture untouched; no temporary file left
    sh = mrml.scene.GetSubjectHierarchyNode()
    study = sh.GetItemParent(sh.GetItemByDataNode(photo))
    assert all(sh.GetItemParent(sh.GetItemByDataNode(n)) == study for n in (result.segmentationNode, unc, result.tableNode))
    assert np.array_equal(slicer.util.arrayFromVolume(photo), original)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_grey_picture_runs_through_start_and_finish(mrml, picture_model_dir, tmp_path):
    """A grey picture (a single-slice scalar volume) is replicated into red, green and blue, through the widget's
    non-blocking path."""
    grey = add_volume("Grey photo", picture(colour=False), PICTURE_IJK_TO_RAS)
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")

    run = logic.startRun(grey, picture_model_dir, "cpu")
    deadline = time.monotonic() + 120
    while not run.finished and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.05)
    result = logic.finishRun(run)

    assert volumeDimensions(result.uncertaintyVolumeNode) == volumeDimensions(grey)
    assert np.array_equal(ijkToRasArray(result.uncertaintyVolumeNode), PICTURE_IJK_TO_RAS)
    assert [e["volume"] for e in result.summary["inputs"]] == [0, 0, 0]
    assert {e["node_name"] for e in result.summary["inputs"]} == {"Grey photo"}
    panel = confidencePanel(result.summary)
    assert panel.picture and panel.singleVolume and panel.singleInputText == "from a grey picture"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_alpha_is_dropped_and_other_components_are_refused(check_refused, mrml, picture_model_dir, tmp_path):
    """As the engine reads pictures: RGBA -> RGB, grey + alpha -> grey; any other count of components is refused,
    and so is a grey picture for a model that needs the three colours."""
    info = readModelInfo(picture_model_dir)
    rgba = add_volume("rgba", np.concatenate([picture(), np.full((1,) + PICTURE_SHAPE + (1,), 255, np.uint8)], axis=-1),
                      PICTURE_IJK_TO_RAS, node_class="vtkMRMLVectorVolumeNode")
    assert [s.channel for s in planInputs(rgba, (), info).sources] == ["rgb"]
    grey_alpha = add_volume("grey+alpha", picture()[..., :2], PICTURE_IJK_TO_RAS, node_class="vtkMRMLVectorVolumeNode")
    assert [s.channel for s in planInputs(grey_alpha, (), info).sources] == ["grey"]
    five = add_volume("five", np.repeat(picture(), 2, axis=-1)[..., :5], PICTURE_IJK_TO_RAS, node_class="vtkMRMLVectorVolumeNode")
    check_refused(lambda logic: logic.process(five, model=picture_model_dir),
                  r"the input 'five' \(vtkMRMLVectorVolumeNode\) is a picture of 5 component\(s\), but model 'UML test "
                  r"picture model' reads pictures of 1 \(grey\) or 3 \(red, green, blue\) colour\(s\): load an RGB picture "
                  r"or a grey picture$")

    grey_only = dataclasses.replace(info, channels=("grey",))  # a model of grey pictures, given a colour one
    with pytest.raises(InputError, match=r"is a picture of 4 component\(s\), but model 'UML test picture model' reads "
                                         r"pictures of 1 \(grey\) colour\(s\): load a grey picture$"):
        planInputs(rgba, (), grey_only)
    assert [s.channel for s in planInputs(grey_alpha, (), grey_only).sources] == ["grey"]

    rgb_only = tmp_path / "rgb-only"  # the same model, its card asking for all three colours
    shutil.copytree(picture_model_dir, rgb_only)
    card = json.loads((rgb_only / "model.json").read_text())
    card["input"]["min_channels"] = 3
    (rgb_only / "model.json").write_text(json.dumps(sealed(card)))
    grey = add_volume("grey", picture(colour=False), PICTURE_IJK_TO_RAS)
    check_refused(lambda logic: logic.process(grey, model=rgb_only),
                  r"the input 'grey' \(vtkMRMLScalarVolumeNode\) is a picture of 1 component\(s\), but model 'UML test "
                  r"picture model' reads pictures of 3 \(red, green, blue\) colour\(s\): load an RGB picture$")


def test_a_volume_or_phases_for_a_picture_model_are_refused(check_refused, photo, picture_model_dir):
    """Refused in the module, before any engine starts (``check_refused``: no temporary folder was made)."""
    volume = add_volume()  # 6 slices
    check_refused(lambda logic: logic.process(volume, model=picture_model_dir),
                  r"the input 'MRBreast' \(vtkMRMLScalarVolumeNode\) is a 3D volume of 40x32x6 voxels \(6 slices\), but "
                  r"model 'UML test picture model' reads 2D pictures \(red, green, blue\): load a picture \(PNG, JPEG, "
                  r"BMP, TIFF\), or pick a model made for volumes$")
    colour_volume = add_volume("colour volume", np.repeat(picture(), 4, axis=0), PICTURE_IJK_TO_RAS,
                               node_class="vtkMRMLVectorVolumeNode")
    check_refused(lambda logic: logic.process(colour_volume, model=picture_model_dir), r"is a 3D volume of 48x40x4 voxels")
    other = add_volume("other photo", picture(1), PICTURE_IJK_TO_RAS, node_class="vtkMRMLVectorVolumeNode")
    check_refused(lambda logic: logic.process(photo, model=picture_model_dir, phaseNodes=[other]),
                  r"model 'UML test picture model' reads one picture \(red, green, blue\): clear the extra phase volumes$")


def test_the_engines_refusal_names_the_picture_node(check_refused, picture_model_dir):
    """A picture whose every colour is constant is refused by the engine (exit 2); its message names the node, not
    the temporary file it was written to, and nothing is created."""
    flat = np.full_like(picture(), 90)
    node = add_volume("Flat", flat, PICTURE_IJK_TO_RAS, node_class="vtkMRMLVectorVolumeNode")
    message = check_refused(lambda logic: logic.process(node, model=picture_model_dir, device="cpu"),
                            r"^every colour of the picture is flat: the input 'Flat' \(red\) is a constant image "
                            r"\(every voxel is 90\): ")
    assert "UML-" not in message and ".nrrd" not in message


def test_a_picture_without_one_colour_runs(mrml, picture_model_dir, tmp_path):
    """No blue at all (a flat colour) is read as zeros: the picture still runs."""
    no_blue = picture()
    no_blue[..., 2] = 0
    node = add_volume("No blue", no_blue, PICTURE_IJK_TO_RAS, node_class="vtkMRMLVectorVolumeNode")
    result = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp").process(node, model=picture_model_dir,
                                                                               device="cpu")
    assert result.segmentationNode is not None and [i["channel"] for i in result.summary["inputs"]] == [
        "red", "green", "blue"]


def test_process_folder_with_picture_files(mrml, picture_model_dir, tmp_path):
    """PNG files (RGB, grey, RGBA) with ``pattern="*.png"``: per case a .seg.nrrd, an uncertainty NRRD and a summary
    on the picture's pixel grid, and one CSV row each."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    rgb = picture(3)[0]
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(inputs / "colour.png"))
    sitk.WriteImage(sitk.GetImageFromArray(picture(4, colour=False)[0]), str(inputs / "grey.png"))
    rgba = np.concatenate([picture(5)[0], np.full(PICTURE_SHAPE + (1,), 255, np.uint8)], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(inputs / "with-alpha.png"))
    out = tmp_path / "out"
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")

    csv_path = logic.processFolder(inputs, out, model=picture_model_dir, pattern="*.png", device="cpu", reviewThreshold=0.5)

    rows = {r["case_id"]: r for r in csv.DictReader(open(csv_path, newline="", encoding="utf-8"))}
    assert csv_path == out / RESULTS_CSV and list(rows) == ["colour", "grey", "with-alpha"]
    for case, row in rows.items():
        assert row["status"] == "ok", row["error"]
        assert row["input"] == str(inputs / f"{case}.png") and row["model_id"] == "uml-test-picture"
        unc = sitk.ReadImage(str(out / f"{case}_uncertainty.nrrd"))
        assert unc.GetSize() == (PICTURE_SHAPE[1], PICTURE_SHAPE[0], 1)
        u = sitk.GetArrayFromImage(unc)
        assert u.dtype == np.float32 and 0.0 <= u.min() and u.max() <= 1.0
        summary = json.loads((out / f"{case}_summary.json").read_text())
        assert summary["case_id"] == case and summary["geometry"]["size"] == [PICTURE_SHAPE[1], PICTURE_SHAPE[0], 1]
        assert [e["volume"] for e in summary["inputs"]] == ([0, 0, 0] if case == "grey" else [0, 1, 2])
        assert read_segmentation_file(out / f"{case}.seg.nrrd")[1] == ["Lesion", "Review (uncertain)"]
    assert sorted(p.name for p in inputs.iterdir()) == ["colour.png", "grey.png", "with-alpha.png"]
    assert list((tmp_path / "tmp").iterdir()) == []
