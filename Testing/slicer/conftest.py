"""Fixtures for the Slicer-side tests: a real MRML scene under the PyPI package ``slicer-core``, freshly
initialised model bundles (volume and picture models), small volume nodes and the check of a refused run (helpers in ``umlslicer_helpers.py``).

``slicer-core`` has MRML and the module logics but no application: the ``mrml`` fixture creates the scene,
sets ``slicer.mrmlScene`` and registers the Colors / Subject hierarchy / Segmentations / Volumes /
Terminologies / Tables logics with an application logic (their default files are not shipped, so they log
harmless errors).

This folder is the package ``Testing.slicer`` (``pytest.ini`` puts ``UMLSegmentation`` on ``sys.path`` for
``UMLSegmentationLib``); the repository root, not ``Testing/``, is on ``sys.path``, so it does not shadow the
``slicer`` package.
"""

from __future__ import annotations

from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")

from .umlslicer_helpers import MRML, add_volume, make_card, scene_node_ids  # noqa: E402


@pytest.fixture
def mrml():
    """A fresh scene as ``slicer.mrmlScene`` (restored afterwards)."""
    previous = getattr(slicer, "mrmlScene", None)
    env = MRML()
    slicer.mrmlScene = env.scene
    try:
        yield env
    finally:
        env.close()
        slicer.mrmlScene = previous


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """A freshly initialised (untrained, seeded) small bundle with three DCE channels."""
    import torch
    from umlcore.bundle import save_bundle
    from umlcore.network import UMLNet

    card, config = make_card()
    torch.manual_seed(0)
    return save_bundle(UMLNet(config), card, tmp_path_factory.mktemp("models") / card.id)


@pytest.fixture(scope="session")
def picture_model_dir(tmp_path_factory) -> Path:
    """A bundle for 2D pictures: ``input.kind`` picture, channels red, green, blue (a grey picture is replicated:
    ``min_channels`` 1), every picture resized to 32 x 32 pixels for the network."""
    import torch
    from umlcore.bundle import save_bundle
    from umlcore.network import UMLNet

    card, config = make_card("uml-test-picture", ("red", "green", "blue"), name="UML test picture model",
                             kind="picture", target_size=(32, 32))
    torch.manual_seed(0)
    return save_bundle(UMLNet(config), card, tmp_path_factory.mktemp("models") / card.id)


@pytest.fixture(scope="session")
def shipped_sample_prediction():
    """The shipped default model's prediction (umlcore, in process, CPU) for the shipped sample case."""
    from umlcore.bundle import load_bundle
    from umlcore.catalogue import DEFAULT_MODEL_ID, resolve_model
    from umlcore.io import read_case
    from umlcore.predictor import Predictor
    from UMLSegmentationLib.paths import sampleDataDirectory
    from UMLSegmentationLib.sampledata import SAMPLE_CASES

    phases = read_case([sampleDataDirectory() / f.fileName for f in SAMPLE_CASES[0].files])
    return Predictor(load_bundle(resolve_model(DEFAULT_MODEL_ID)), device="cpu").predict(phases)


@pytest.fixture
def volume(mrml):
    """The input volume, placed in a patient / study of the subject hierarchy."""
    node = add_volume()
    sh = mrml.scene.GetSubjectHierarchyNode()
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "Study 1")
    sh.CreateItem(study, node)
    return node


@pytest.fixture
def check_refused(mrml, tmp_path):
    """``check_refused(call, match, error=InputError)``: ``call(logic)`` (a fresh ``UMLSegmentationLogic`` with its
    temporary folder in ``tmp_path / "tmp"``) raises one ``error`` whose one-line message (the problem, then the
    fix) matches ``match``; no node is added or removed and no temporary file is left. Returns the message."""
    from UMLSegmentationLib.errors import InputError
    from UMLSegmentationLib.logic import UMLSegmentationLogic

    logic = UMLSegmentationLogic(temporaryDirectory=tmp_path / "tmp")

    def run(call, match, error=InputError):
        before = scene_node_ids(mrml.scene)
        with pytest.raises(error, match=match) as info:
            call(logic)
        message = str(info.value)
        assert "\n" not in message and ": " in message  # one line: the problem, then the fix
        assert scene_node_ids(mrml.scene) == before
        tmp = tmp_path / "tmp"
        assert not tmp.exists() or list(tmp.iterdir()) == []
        return message

    return run
