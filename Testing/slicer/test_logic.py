"""``UMLSegmentationLogic`` (``UMLSegmentationLib.logic``): ``process`` (a volume node -> the real engine in a
subprocess -> output nodes), ``processFolder`` (a folder of files -> per-case .seg.nrrd, uncertainty, summary + one
CSV), cancel, the option and output-node checks, and the engine's Python packages."""

from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import slicer
from UMLSegmentationLib.errors import InputError, RunCancelled
from UMLSegmentationLib.inputs import ijkToRasArray, volumeDimensions
from UMLSegmentationLib.dependencies import ENGINE_PACKAGES
from UMLSegmentationLib.logic import OUTPUT_MARKER, RESULTS_CSV, UMLSegmentationLogic
from UMLSegmentationLib.outputs import (
    REVIEW_SEGMENT_ID,
    REVIEW_SEGMENT_NAME,
    ROLE_ATTRIBUTE,
    SUMMARY_ATTRIBUTE,
    OutputNodes,
    summaryFromTable,
)
from UMLSegmentationLib.summary import flattenSummary, unflattenRows

from .umlslicer_helpers import (
    IJK_TO_RAS,
    LESION_COLOR,
    LESION_TERMINOLOGY,
    REPO,
    add_volume,
    alive,
    phantom,
    read_segmentation_file,
    scene_node_ids,
    segment_array,
    third_party_imports,
    write_case,
)

OUTPUT_CLASSES = ("vtkMRMLSegmentationNode", "vtkMRMLScalarVolumeNode", "vtkMRMLTableNode", "vtkMRMLNode")

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="process checks read /proc")


# ---------------------------------------------------------------------------------------------- process


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


# ---------------------------------------------------------------------------------------------- processFolder


def test_process_folder_writes_per_case_files_and_one_csv(mrml, bundle_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = {f"case{i}": write_case(inputs / f"case{i}.nii.gz", i, spacing=(0.8, 0.75, 2.0 + i)) for i in range(3)}
    write_case(inputs / "other.nrrd", 9)  # does not match the pattern
    out = tmp_path / "out"
    nodes_before = mrml.count()
    events = []
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")

    csv_path = logic.processFolder(inputs, out, model=bundle_dir, device="cpu", progressCallback=events.append, reviewThreshold=0.6)

    assert csv_path == out / RESULTS_CSV
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [RESULTS_CSV, OUTPUT_MARKER] + [f"case{i}{suffix}" for i in range(3) for suffix in (".seg.nrrd", "_uncertainty.nrrd", "_summary.json")]
    )
    assert mrml.count() == nodes_before  # no node added to the user's scene
    assert list((tmp_path / "tmp").iterdir()) == []
    assert events[-1].stage == "finished" and all(0.0 <= e.fraction <= 1.0 for e in events)

    rows = list(csv.DictReader(open(csv_path, newline="", encoding="utf-8")))
    assert [r["case_id"] for r in rows] == ["case0", "case1", "case2"]
    for row in rows:
        case = row["case_id"]
        summary = json.loads((out / f"{case}_summary.json").read_text())
        assert summary["case_id"] == case
        assert summary["outputs"] == {"segmentation": f"{case}.seg.nrrd", "uncertainty": f"{case}_uncertainty.nrrd", "summary": f"{case}_summary.json"}
        cls = summary["classification"]
        assert row["status"] == "ok" and row["error"] == ""
        assert row["input"] == str(inputs / f"{case}.nii.gz")
        assert row["predicted_class"] == cls["predicted_class"] and row["verdict"] == cls["verdict"]
        assert float(row["positive_probability"]) == cls["positive_probability"]
        assert float(row["lesion_volume_ml"]) == summary["segments"][0]["volume_ml"]
        assert int(row["lesion_voxel_count"]) == summary["segments"][0]["voxel_count"]
        assert row["model_id"] == "uml-test-small" and row["segmentation_file"] == str(out / f"{case}.seg.nrrd")

        # the uncertainty map lies on the input grid
        unc = sitk.ReadImage(str(out / f"{case}_uncertainty.nrrd"))
        ref = images[case]
        assert unc.GetSize() == ref.GetSize()
        assert np.allclose(unc.GetSpacing(), ref.GetSpacing()) and np.allclose(unc.GetOrigin(), ref.GetOrigin())
        assert np.allclose(unc.GetDirection(), ref.GetDirection())
        u = sitk.GetArrayFromImage(unc)
        assert u.dtype == np.float32 and 0.0 <= u.min() and u.max() <= 1.0

        # the .seg.nrrd carries the card's segment, its terminology, and the Review segment
        segmentation, names = read_segmentation_file(out / f"{case}.seg.nrrd")
        assert names == ["Lesion", "Review (uncertain)"]
        assert LESION_TERMINOLOGY["type"]["code"] in segmentation.GetSegment("UML_label_1").GetTerminology()


def test_process_folder_records_a_failing_case_and_goes_on(mrml, bundle_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_case(inputs / "good.nii.gz", 1)
    (inputs / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    out = tmp_path / "out"
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")

    csv_path = logic.processFolder(inputs, out, model=bundle_dir, device="cpu")

    rows = {r["case_id"]: r for r in csv.DictReader(open(csv_path, newline="", encoding="utf-8"))}
    assert list(rows) == ["broken", "good"]
    assert rows["good"]["status"] == "ok" and rows["good"]["predicted_class"] in ("no pCR", "pCR")
    assert rows["broken"]["status"] == "error" and "broken.nii.gz" in rows["broken"]["error"]
    assert rows["broken"]["segmentation_file"] == ""
    assert not (out / "broken.seg.nrrd").exists() and (out / "good.seg.nrrd").exists()
    assert list((tmp_path / "tmp").iterdir()) == []

    with pytest.raises(InputError, match="broken.nii.gz"):
        logic.processFolder(inputs, tmp_path / "out2", model=bundle_dir, device="cpu", onError="raise")
    assert list((tmp_path / "tmp").iterdir()) == []


def test_process_folder_refuses_bad_folders_before_running(mrml, bundle_dir, tmp_path):
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")
    with pytest.raises(InputError, match="does not exist"):
        logic.processFolder(tmp_path / "missing", tmp_path / "out", model=bundle_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no input matches '\*.nii.gz'"):
        logic.processFolder(tmp_path / "empty", tmp_path / "out", model=bundle_dir)
    clash = tmp_path / "clash"
    clash.mkdir()
    write_case(clash / "a.nii.gz", 0)
    write_case(clash / "a.nrrd", 0)
    with pytest.raises(InputError, match=r"case name\(s\) \['a'\]"):
        logic.processFolder(clash, tmp_path / "out", model=bundle_dir, pattern="a.*")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- processFolder: nothing lost


def _snapshot(folder):
    """Every file under ``folder`` with its bytes (links as their target): compared before and after a refusal."""
    found = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            p = os.path.join(root, name)
            if os.path.islink(p):
                found[p] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                found[p] = open(p, "rb").read()
    return found


def _case_outputs(case):
    return [f"{case}.seg.nrrd", f"{case}_uncertainty.nrrd", f"{case}_summary.json"]


def _marker(out):
    data = json.loads((out / OUTPUT_MARKER).read_text())
    assert data["written_by"] == "UML Slicer folder mode"
    return data["files"]


@pytest.mark.parametrize("layout", ["previous-result-as-input", "uncertainty-name", "results-csv", "link-to-input"])
def test_process_folder_never_replaces_an_input(check_refused, bundle_dir, tmp_path, layout):
    """An output that is (resolved through links) one of the inputs is refused before the engine runs: nothing is
    written, every input keeps its bytes."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_case(inputs / "case.nii.gz", 0)
    out, pattern = inputs, "*"
    if layout == "previous-result-as-input":  # '*' in the output folder takes an earlier result for a case
        write_case(inputs / "case.seg.nrrd", 1)
        victim = inputs / "case.seg.nrrd"
    elif layout == "uncertainty-name":  # case 'a' writes a_uncertainty.nrrd, which is the input of case 'a_uncertainty'
        write_case(inputs / "a.nrrd", 1)
        write_case(inputs / "a_uncertainty.nrrd", 2)
        pattern, victim = "*.nrrd", inputs / "a_uncertainty.nrrd"
    elif layout == "results-csv":
        (inputs / RESULTS_CSV).write_text("case_id,notes\ncase,my own notes\n")
        victim = inputs / RESULTS_CSV
    else:  # the output folder holds a link named like an output, pointing at an input elsewhere
        out, pattern, victim = tmp_path / "out", "*.nii.gz", inputs / "case.nii.gz"
        out.mkdir()
        os.symlink(inputs / "case.nii.gz", out / "case.seg.nrrd")
    before = _snapshot(tmp_path)
    message = check_refused(lambda logic: logic.processFolder(inputs, out, model=bundle_dir, pattern=pattern, device="cpu"),
                            r"would replace the input ")
    assert str(victim) in message and message.endswith(
        "UML never replaces or writes into an input; choose another output folder (or rename the input)")
    assert _snapshot(tmp_path) == before


def test_process_folder_never_writes_into_a_dicom_case_folder(check_refused, bundle_dir, tmp_path):
    """An output folder inside an input (DICOM) case folder, directly or through a link, is refused before the
    engine runs, and nothing is created there."""
    inputs = tmp_path / "in"
    dicom = inputs / "patient1"
    dicom.mkdir(parents=True)
    for i in range(3):
        (dicom / f"IM{i:04d}").write_bytes(b"\0" * 128 + b"DICM" + bytes([i]))
    write_case(inputs / "case0.nii.gz", 0)
    (tmp_path / "link").symlink_to(dicom)
    before = _snapshot(tmp_path)
    for out in (dicom / "results", tmp_path / "link" / "results"):
        message = check_refused(lambda logic: logic.processFolder(inputs, out, model=bundle_dir, pattern="*", device="cpu"),
                                r"lies inside the input folder .*patient1: UML never writes into an input; "
                                r"choose an output folder outside it$")
        assert message.startswith(f"output folder {out} ")
        assert not (dicom / "results").exists()
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("marker", [None, "other-files", "other-writer", "not-json"])
def test_process_folder_refuses_a_file_it_did_not_write(check_refused, bundle_dir, tmp_path, marker):
    """An existing file named like an output that folder mode did not write (not listed in the output folder's
    marker) is refused by name with the fix; nothing is written and the file keeps its bytes."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_case(inputs / "case0.nii.gz", 0)
    write_case(inputs / "case1.nii.gz", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "case1.seg.nrrd").write_bytes(b"a segmentation drawn by hand")
    (out / "notes.txt").write_text("unrelated")
    if marker == "other-files":
        (out / OUTPUT_MARKER).write_text(json.dumps({"written_by": "UML Slicer folder mode", "files": ["case9.seg.nrrd"]}))
    elif marker == "other-writer":
        (out / OUTPUT_MARKER).write_text(json.dumps({"written_by": "someone else", "files": ["case1.seg.nrrd"]}))
    elif marker == "not-json":
        (out / OUTPUT_MARKER).write_text("case1.seg.nrrd")
    before = _snapshot(tmp_path)
    message = check_refused(lambda logic: logic.processFolder(inputs, out, model=bundle_dir, device="cpu"),
                            r"exists and was not written by UML's folder mode")
    assert message == (f"output {out / 'case1.seg.nrrd'} exists and was not written by UML's folder mode (it is not "
                       f"listed in {out / OUTPUT_MARKER}): UML replaces only its own outputs; choose another output "
                       "folder, or move it away yourself")
    assert _snapshot(tmp_path) == before


def test_process_folder_reruns_replace_its_own_files_and_leave_others(mrml, bundle_dir, tmp_path):
    """Into a subfolder of the input folder holding an unrelated file: the run lists what it wrote in the marker, a
    rerun replaces those files, a narrower run keeps the others listed; the input folder itself works as output."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_case(inputs / "case0.nii.gz", 0)
    write_case(inputs / "case1.nii.gz", 1)
    out = inputs / "results"
    out.mkdir()
    (out / "notes.txt").write_text("unrelated")
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")
    ours = sorted(_case_outputs("case0") + _case_outputs("case1") + [RESULTS_CSV])

    logic.processFolder(inputs, out, model=bundle_dir, pattern="*", device="cpu")  # 'results' is not a case
    assert sorted(p.name for p in out.iterdir()) == sorted(ours + ["notes.txt", OUTPUT_MARKER])
    assert _marker(out) == ours

    (out / "case0_summary.json").write_text("stale")
    logic.processFolder(inputs, out, model=bundle_dir, pattern="*", device="cpu")
    assert json.loads((out / "case0_summary.json").read_text())["case_id"] == "case0"  # replaced
    assert (out / "notes.txt").read_text() == "unrelated" and _marker(out) == ours

    logic.processFolder(inputs, out, model=bundle_dir, pattern="case1.*", device="cpu")
    assert _marker(out) == ours  # case0's files stay listed: a later run may still replace them
    assert [r["case_id"] for r in csv.DictReader(open(out / RESULTS_CSV, newline="", encoding="utf-8"))] == ["case1"]

    logic.processFolder(inputs, inputs, model=bundle_dir, device="cpu")  # nothing collides: fine
    assert _marker(inputs) == ours
    assert sorted(p.name for p in inputs.iterdir()) == sorted(ours + ["case0.nii.gz", "case1.nii.gz", "results", OUTPUT_MARKER])
    assert list((tmp_path / "tmp").iterdir()) == []


# ---------------------------------------------------------------------------------------------- cancel


@linux_only
def test_cancel_from_the_progress_callback_leaves_nothing_and_no_busy_engine(mrml, volume, bundle_dir, tmp_path):
    """Cancelled at the engine's first progress line: no node, no temporary file, and no engine left working (it was
    ended, or had already answered and waits warm; test_server.py ends a busy one deterministically)."""
    before = scene_node_ids(mrml.scene)
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")
    seen = []

    def callback(event):
        seen.append(event.stage)
        if event.stage == "read":  # the engine is running: it reports reading its input
            raise RunCancelled()

    with pytest.raises(RunCancelled):
        logic.process(volume, model=bundle_dir, device="cpu", progressCallback=callback)
    assert "read" in seen and "import" not in seen
    assert scene_node_ids(mrml.scene) == before
    assert list((tmp_path / "tmp").iterdir()) == []
    server = logic.engines.server
    assert not alive(server.pid) or server.idle


@linux_only
def test_cancel_a_started_run_before_any_progress(mrml, volume, bundle_dir, tmp_path):
    before = scene_node_ids(mrml.scene)
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")
    run = logic.startRun(volume, bundle_dir, "cpu")
    assert run.temporaryDirectory.is_dir() and (run.temporaryDirectory / "inputs" / "MRBreast.nrrd").is_file()
    assert not run.finished
    run.cancel()
    assert run.finished and not alive(run.engine.pid)
    assert not run.temporaryDirectory.exists()
    with pytest.raises(RunCancelled):
        logic.finishRun(run)
    assert scene_node_ids(mrml.scene) == before
    assert list((tmp_path / "tmp").iterdir()) == []


# ---------------------------------------------------------------------------------------------- checks before a run


def test_bad_options_and_output_nodes(check_refused, mrml, bundle_dir):
    node = add_volume()
    check_refused(lambda logic: logic.process(node, model=bundle_dir, device="gpu"), r"device 'gpu' is unknown: use 'auto'")
    check_refused(lambda logic: logic.process(node, model=bundle_dir, batchSize=0), r"batch size 0 is not allowed")
    check_refused(lambda logic: logic.process(node, model=bundle_dir, reviewThreshold=1.5), r"reviewThreshold 1.5 is not allowed")
    check_refused(lambda logic: logic.process(node, model=bundle_dir, outputs=OutputNodes(uncertainty=node)), r"is one of the inputs")
    labels = add_volume("labels", (phantom() > 500).astype(np.uint8), node_class="vtkMRMLLabelMapVolumeNode")
    check_refused(lambda logic: logic.process(node, model=bundle_dir, outputs=OutputNodes(uncertainty=labels)),
                  r"is a vtkMRMLLabelMapVolumeNode")


def test_missing_engine_packages_are_named_with_the_fix(monkeypatch, mrml, bundle_dir):
    from UMLSegmentationLib import dependencies

    monkeypatch.setitem(dependencies.ENGINE_PACKAGES, "uml_no_such_module", "uml-no-such-package")
    logic = UMLSegmentationLogic()
    assert logic.missingPythonPackages() == ["uml-no-such-package"]
    with pytest.raises(InputError, match=r"uml-no-such-package missing for the UML engine: run slicer.util.pip_install\('uml-no-such-package'\)"):
        logic.process(add_volume(), model=bundle_dir)


def test_one_plan_names_an_old_or_missing_torch_and_nibabel_only_for_files():
    from UMLSegmentationLib.dependencies import planDependencies

    def world(modules, torch_version):
        find = lambda name: object() if name in modules else None  # noqa: E731
        def version(dist):
            if dist != "torch" or torch_version is None:
                raise __import__("importlib.metadata").metadata.PackageNotFoundError(dist)
            return torch_version
        return find, version

    everything = {"torch", "numpy", "SimpleITK", "safetensors", "nibabel"}
    assert planDependencies("files", *world(everything, "2.13.0+cpu")).ready
    assert planDependencies("nodes", *world(everything - {"nibabel"}, "2.1.0a0+git")).ready  # a node run writes NRRD
    files = planDependencies("files", *world(everything - {"nibabel"}, "2.1.0"))
    assert files.pip == ("nibabel",) and files.torch == "ok"
    old = planDependencies("nodes", *world(everything - {"safetensors"}, "2.0.1+cu118"))
    assert old.torch == "too-old" and old.torchVersion == "2.0.1+cu118" and old.pip == ("safetensors",)
    assert old.question().count("PyTorch") == 2 and "2.0.1+cu118 is installed, UML needs >=2.1" in old.question()
    assert "torch >=2.1 (found 2.0.1+cu118), safetensors missing" in old.problem()
    assert "\n" not in old.problem() and "PyTorch Utils" in old.problem()
    missing = planDependencies("nodes", *world(everything - {"torch"}, None))
    assert missing.torch == "missing" and missing.question().startswith("UML needs PyTorch (with the PyTorch extension")


def test_engine_packages_cover_what_umlcore_needs():
    """What the module checks (and offers to install) before starting the engine covers every module umlcore
    imports at module level, and stays within umlcore's declared dependencies."""
    import re
    import tomllib

    assert third_party_imports(REPO / "UMLCore" / "umlcore") <= set(ENGINE_PACKAGES)
    declared = tomllib.loads((REPO / "UMLCore" / "pyproject.toml").read_text())["project"]["dependencies"]
    declared_names = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in declared}
    assert {pip.lower() for pip in ENGINE_PACKAGES.values()} <= declared_names
