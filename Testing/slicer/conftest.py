"""Fixtures for the Slicer-side tests: a real MRML scene under the PyPI package ``slicer-core``, freshly
initialised model bundles, and small volume nodes (helpers in ``umlslicer_helpers.py``).

``slicer-core`` has MRML and the module logics but no application: the ``mrml`` fixture creates the scene,
sets ``slicer.mrmlScene`` and registers the Colors / Subject hierarchy / Segmentations / Volumes /
Terminologies / Tables logics with an application logic (their default files are not shipped, so they log
harmless errors).

This folder is called ``slicer``: the ``slicer`` meta-package extends its ``__path__`` with every
``<sys.path entry>/slicer`` folder and imports the modules it finds there. pytest puts ``Testing/`` on
``sys.path`` (for ``Testing/conftest.py``), which would make this folder part of the ``slicer`` package, so
``slicer`` is imported here first with that entry hidden.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _import_slicer_without_this_folder():
    hidden = [(i, p) for i, p in enumerate(sys.path) if (Path(p or ".").resolve() / "slicer") == HERE]
    for _, p in reversed(hidden):
        sys.path.remove(p)
    try:
        import slicer  # noqa: F401
    finally:
        for i, p in hidden:
            sys.path.insert(i, p)


if "slicer" not in sys.modules:
    _import_slicer_without_this_folder()
for path in (str(REPO / "UMLSegmentation"), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

slicer = pytest.importorskip("slicer")

from umlslicer_helpers import MRML, add_volume, make_card  # noqa: E402


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
def rgb_bundle_dir(tmp_path_factory) -> Path:
    """A bundle whose channels are an RGB colour image."""
    import torch
    from umlcore.bundle import save_bundle
    from umlcore.network import UMLNet

    card, config = make_card("uml-test-rgb", ("red", "green", "blue"))
    torch.manual_seed(0)
    return save_bundle(UMLNet(config), card, tmp_path_factory.mktemp("models") / card.id)


@pytest.fixture
def volume(mrml):
    """The input volume, placed in a patient / study of the subject hierarchy."""
    node = add_volume()
    sh = mrml.scene.GetSubjectHierarchyNode()
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "Study 1")
    sh.CreateItem(study, node)
    return node
