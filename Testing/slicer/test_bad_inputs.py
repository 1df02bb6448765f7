"""Bad inputs raise one clear error, create no node and leave no temporary file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from umlslicer_helpers import IJK_TO_RAS, add_volume, phantom

from UMLSegmentationLib.errors import EngineError, InputError
from UMLSegmentationLib.logic import UMLSegmentationLogic
from UMLSegmentationLib.outputs import OutputNodes


@pytest.fixture
def check(mrml, tmp_path):
    """``check(call, match)``: ``call(logic)`` raises one InputError matching ``match``; nothing is left behind."""
    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")

    def run(call, match, error=InputError):
        before = sorted(mrml.scene.GetNthNode(i).GetID() for i in range(mrml.scene.GetNumberOfNodes()))
        with pytest.raises(error, match=match) as info:
            call(logic)
        message = str(info.value)
        assert "\n" not in message and ": " in message  # one line: the problem, then the fix
        after = sorted(mrml.scene.GetNthNode(i).GetID() for i in range(mrml.scene.GetNumberOfNodes()))
        assert after == before
        tmp = tmp_path / "tmp"
        assert not tmp.exists() or list(tmp.iterdir()) == []
        return message

    return run


def test_no_volume(check, bundle_dir):
    check(lambda logic: logic.process(None, model=bundle_dir), r"no input volume given: select a volume")


def test_not_an_image(check, mrml, bundle_dir):
    table = mrml.scene.AddNewNodeByClass("vtkMRMLTableNode", "t")
    check(lambda logic: logic.process(table, model=bundle_dir), r"is a vtkMRMLTableNode, not an image volume")
    labels = add_volume("labels", (phantom() > 500).astype(np.uint8), node_class="vtkMRMLLabelMapVolumeNode")
    check(lambda logic: logic.process(labels, model=bundle_dir), r"is a labelmap, not an image")
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    check(lambda logic: logic.process(empty, model=bundle_dir), r"holds no voxels")


def test_rgb_volume_for_a_grayscale_model_and_the_reverse(check, mrml, bundle_dir, rgb_bundle_dir):
    rgb = add_volume("photo", np.zeros((1, 32, 40, 3), np.uint8), node_class="vtkMRMLVectorVolumeNode")
    message = check(lambda logic: logic.process(rgb, model=bundle_dir), r"is an RGB colour image, but model 'UML test model' expects grayscale volumes \(pre, early, late\)")
    assert "Vector to Scalar Volume" in message
    gray = add_volume()
    check(lambda logic: logic.process(gray, model=rgb_bundle_dir), r"expects an RGB colour image")


def test_4d_input_without_the_right_phases(check, bundle_dir):
    two_frames = add_volume("dce2", np.stack([phantom(0), phantom(1)], axis=-1).astype(np.float32), node_class="vtkMRMLVectorVolumeNode")
    check(lambda logic: logic.process(two_frames, model=bundle_dir), r"is 4D with 2 frames, but model 'UML test model' expects 3 phases \(pre, early, late\)")
    three = add_volume("dce3", np.stack([phantom(i) for i in range(3)], axis=-1).astype(np.float32), node_class="vtkMRMLVectorVolumeNode")
    other = add_volume("other")
    check(lambda logic: logic.process(three, model=bundle_dir, phaseNodes=[other]), r"already has 3 frames")


def test_phase_volumes_that_do_not_fit(check, bundle_dir):
    pre = add_volume("pre")
    early = add_volume("early")
    check(lambda logic: logic.process(pre, model=bundle_dir, phaseNodes=[early]), r"2 volumes given, but model 'UML test model' expects 1 .* or 3")
    shifted = IJK_TO_RAS.copy()
    shifted[0, 3] += 1.0
    moved = add_volume("moved", ijk_to_ras=shifted)
    late = add_volume("late")
    check(lambda logic: logic.process(pre, model=bundle_dir, phaseNodes=[moved, late]), r"'early' phase volume 'moved' .* is not on the input volume's grid")
    check(lambda logic: logic.process(pre, model=bundle_dir, phaseNodes=[early, early]), r"selected twice")


def test_invalid_model_files(check, bundle_dir, tmp_path):
    node = add_volume()
    check(lambda logic: logic.process(node, model=tmp_path / "nowhere"), r"does not exist")
    not_a_bundle = tmp_path / "folder"
    not_a_bundle.mkdir()
    check(lambda logic: logic.process(node, model=not_a_bundle), r"is not a UML model bundle \(no model.json\)")
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    (broken / "model.json").write_text("{ not json")
    check(lambda logic: logic.process(node, model=broken), r"is not valid JSON")
    card = json.loads((bundle_dir / "model.json").read_text())
    wrong_schema = tmp_path / "schema"
    shutil.copytree(bundle_dir, wrong_schema)
    (wrong_schema / "model.json").write_text(json.dumps({**card, "schema_version": 99}))
    check(lambda logic: logic.process(node, model=wrong_schema), r"schema_version 99")
    check(lambda logic: logic.process(node, model="no-such-model-id"), r"no model with id 'no-such-model-id'")


def test_tampered_weights_are_refused_by_the_engine(check, bundle_dir, tmp_path):
    """The card reads fine, the engine's hash check refuses the weights: its message, one InputError, no node."""
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle_dir, tampered)
    weights = tampered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    node = add_volume()
    message = check(lambda logic: logic.process(node, model=tampered, device="cpu"), r"does not match the sha256")
    assert not message.startswith("uml:")


def test_bad_options_and_output_nodes(check, mrml, bundle_dir):
    node = add_volume()
    check(lambda logic: logic.process(node, model=bundle_dir, device="gpu"), r"device 'gpu' is unknown: use 'auto'")
    check(lambda logic: logic.process(node, model=bundle_dir, batchSize=0), r"batchSize 0 is not allowed")
    check(lambda logic: logic.process(node, model=bundle_dir, reviewThreshold=1.5), r"reviewThreshold 1.5 is not allowed")
    check(lambda logic: logic.process(node, model=bundle_dir, outputs=OutputNodes(uncertainty=node)), r"is one of the inputs")
    labels = add_volume("labels", (phantom() > 500).astype(np.uint8), node_class="vtkMRMLLabelMapVolumeNode")
    check(lambda logic: logic.process(node, model=bundle_dir, outputs=OutputNodes(uncertainty=labels)), r"is a vtkMRMLLabelMapVolumeNode")


def test_engine_that_cannot_start(check, bundle_dir, tmp_path):
    node = add_volume()

    def run(logic):
        logic.pythonExecutable = str(tmp_path / "no-python")
        logic.process(node, model=bundle_dir)

    check(run, r"could not start the UML engine", error=EngineError)
