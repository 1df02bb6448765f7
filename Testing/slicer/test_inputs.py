"""``UMLSegmentationLib.inputs``: the input volumes checked against the model before anything runs.

Each bad input is given to ``logic.process``, the way users meet these checks: one clear error, no node
created, no temporary file left (``check_refused`` in ``conftest.py``).
"""

from __future__ import annotations

import numpy as np

from .umlslicer_helpers import IJK_TO_RAS, PICTURE_IJK_TO_RAS, add_volume, phantom, picture


def test_no_volume(check_refused, bundle_dir):
    check_refused(lambda logic: logic.process(None, model=bundle_dir), r"no input volume given: select a volume")


def test_not_an_image(check_refused, mrml, bundle_dir):
    table = mrml.scene.AddNewNodeByClass("vtkMRMLTableNode", "t")
    check_refused(lambda logic: logic.process(table, model=bundle_dir), r"is a vtkMRMLTableNode, not an image volume")
    labels = add_volume("labels", (phantom() > 500).astype(np.uint8), node_class="vtkMRMLLabelMapVolumeNode")
    check_refused(lambda logic: logic.process(labels, model=bundle_dir), r"is a labelmap, not an image")
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    check_refused(lambda logic: logic.process(empty, model=bundle_dir), r"holds no voxels")


def test_pictures_for_a_volume_model(check_refused, bundle_dir):
    rgb = add_volume("photo", picture(), PICTURE_IJK_TO_RAS, node_class="vtkMRMLVectorVolumeNode")
    message = check_refused(lambda logic: logic.process(rgb, model=bundle_dir),
                            r"is an RGB colour image, but model 'UML test model' expects grayscale volumes \(pre, early, late\)")
    assert "pick a model made for pictures" in message and "Vector to Scalar Volume" in message
    grey = add_volume("grey photo", picture(colour=False), PICTURE_IJK_TO_RAS)
    check_refused(lambda logic: logic.process(grey, model=bundle_dir),
                  r"the input 'grey photo' \(vtkMRMLScalarVolumeNode\) is a single slice \(a 2D picture\), but model "
                  r"'UML test model' reads 3D volumes \(pre, early, late\): load the whole volume, or pick a model made for pictures")
    frames = add_volume("one slice of 3 frames", picture().astype(np.float32), PICTURE_IJK_TO_RAS, node_class="vtkMRMLVectorVolumeNode")
    check_refused(lambda logic: logic.process(frames, model=bundle_dir), r"is a single slice \(a 2D picture\)")


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
