"""Where the module finds its engine, its shipped models and its Python.

The same code runs in three layouts:

* the source tree: ``<repo>/UMLSegmentation/UMLSegmentation.py`` with the engine in ``<repo>/UMLCore/umlcore`` and
  shipped models in ``<repo>/Resources/Models``;
* the built / installed extension: the module's CMake copies ``umlcore`` to
  ``<qt-scripted-modules>/UMLCore/umlcore`` and the shipped models to ``<qt-scripted-modules>/Resources/Models``,
  so the layout relative to the module script is the source tree's with ``..`` dropped (and umlcore's own
  ``catalogue.shipped_models_dir()``, ``parents[2] / "Resources" / "Models"``, finds the same folder);
* plain Python with ``umlcore`` pip-installed (tests, shell): the installed package is used.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Optional

from .errors import EngineError

__all__ = [
    "moduleDirectory",
    "umlcoreSearchPaths",
    "umlcorePythonPath",
    "shippedModelDirectories",
    "userModelDirectory",
    "sampleDataDirectory",
    "defaultPythonExecutable",
    "runningInSlicerApplication",
]


def moduleDirectory() -> Path:
    """The folder that holds ``UMLSegmentation.py`` and the ``UMLSegmentationLib`` package."""
    return Path(__file__).resolve().parents[1]


def umlcoreSearchPaths() -> list[Path]:
    """Folders that may hold the bundled ``umlcore`` package, in the order they are tried."""
    module = moduleDirectory()
    return [module / "UMLCore", module.parent / "UMLCore"]


def umlcorePythonPath() -> Path:
    """The folder to put on the engine's ``PYTHONPATH`` so that ``python -m umlcore`` finds the package.

    Raises:
        EngineError: ``umlcore`` is neither bundled with the module nor importable.
    """
    for candidate in umlcoreSearchPaths():
        if (candidate / "umlcore" / "__init__.py").is_file():
            return candidate
    spec = importlib.util.find_spec("umlcore")
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parents[1]
    searched = ", ".join(str(p) for p in umlcoreSearchPaths())
    raise EngineError(
        f"the UML engine (Python package umlcore) was not found in {searched}: reinstall the UML extension, "
        "or `pip install -e UMLCore` when running from the source tree"
    )


def shippedModelDirectories() -> list[Path]:
    """Existing ``Resources/Models`` folders of the installed extension and of the source tree."""
    module = moduleDirectory()
    candidates = [module / "Resources" / "Models", module.parent / "Resources" / "Models"]
    found: list[Path] = []
    for c in candidates:
        if c.is_dir() and c.resolve() not in [f.resolve() for f in found]:
            found.append(c)
    return found


def userModelDirectory() -> Path:
    """The user's own bundles (the same folder as ``umlcore.catalogue.user_models_dir()``)."""
    return Path.home() / ".uml" / "models"


def sampleDataDirectory() -> Path:
    """The synthetic sample case shipped with the module."""
    return moduleDirectory() / "Resources" / "SampleData"


def runningInSlicerApplication() -> bool:
    """True inside the 3D Slicer application (``slicer.app`` exists), False under ``slicer-core``."""
    import slicer

    return hasattr(slicer, "app")


def defaultPythonExecutable() -> str:
    """The interpreter that runs the engine: Slicer's own Python inside Slicer, else this interpreter.

    Inside Slicer ``PythonSlicer`` (found on ``PATH`` as set up by the launcher) is preferred; it shares
    Slicer's site-packages, where PyTorch was installed by the PyTorch extension.
    """
    if runningInSlicerApplication():
        found: Optional[str] = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable
