"""``UMLSegmentationLib.inputs``: the input volumes checked against the model before anything runs.

Each bad input is given to ``logic.process``, the way users meet these checks: one clear error, no node
created, no temporary file left (``check_refused`` in ``conftest.py``).
"""

from __future__ import annotations

import numpy as np

from .umlslicer_helpers import IJK_TO_RAS, add_volume, phantom


def test_no_volume(check_refused, bundle_dir):
    check_refused(lambda logic: logic.process(None, model=bundle_dir), r"no input volume given: select a volume")


def test_not_an_image(check_refused, mrml, bundle_dir):
    table = mrml.scene.AddNewNodeByClass("vtkMRMLTableNode", "t")
    check_refused(lambda logic: logic.process(table, model=bundle_dir), r"is a vtkMRMLTableNode, not an image volume")
    labels = add_volume("labels", (phantom() > 500).astype(np.uint8), node_class="vtkMRMLLabelMapVolumeNode")
    check_refused(lambda logic: logic.process(labels, model=bundle_dir), r"is a labelmap, not an image")
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    check_refused(lambda logic: logic.process(empty, model=bundle_dir), r"holds no voxels")


def test_rgb_volume_for_a_grayscale_model_and_the_reverse(check_refused, mrml, bundle_dir, rgb_bundle_dir):
    rgb = add_volume("photo", np.zeros((1, 32, 40, 3), np.uint8), node_class="vtkMRMLVectorVolumeNode")
    message = check_refused(lambda logic: logic.process(rgb, model=bundle_dir),
                            r"is an RGB colour image, but model 'UML test model' expects grayscale volumes \(pre, early, late\)")
    assert "Vector to Scalar Volume" in message
    gray = add_volume()
    check_refused(lambda logic: logic.process(gray, model=rgb_bundle_dir), r"expects an RGB colour image")


def test_4d_input_without_the_right_phases(check_refused, bundle_dir):
    two_frames = add_volume("dce2", np.stack([phantom(0), phantom(1)], axis=-1).astype(np.float32), node_class="vtkMRMLVectorVolumeNode")
    check_refused(lambda logic: logic.process(two_frames, model=bundle_dir),
                  r"is 4D with 2 frames, but model 'UML test model' expects 3 phases \(pre, early, late\)")
    three = add_volume("dce3", np.stack([phantom(i) for i in range(3)], axis=-1).astype(np.float32), node_class="vtkMRMLVectorVolumeNode")
    other = add_volume("other")
    check_refused(lambda logic: logic.process(three, model=bundle_dir, phaseNodes=[other]), r"already has 3 frames")


def test_phase_volumes_that_do_not_fit(check_refused, bundle_dir):
    pre = add_volume("pre")
    early = add_volume("early")
    check_refused(lambda logic: logic.process(pre, model=bundle_dir, phaseNodes=[early]),
                  r"2 volumes given, but model 'UML test model' expects 1 .* or 3")
    shifted = IJK_TO_RAS.copy()
    shifted[0, 3] += 1.0
    moved = add_volume("moved", ijk_to_ras=shifted)
    late = add_volume("late")
    check_refused(lambda logic: logic.process(pre, model=bundle_dir, phaseNodes=[moved, late]),
                  r"'early' phase volume 'moved' .* is not on the input volume's grid")
    check_refused(lambda logic: logic.process(pre, model=bundle_dir, phaseNodes=[early, early]), r"selected twice")
