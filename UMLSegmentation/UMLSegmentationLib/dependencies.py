"""The engine's Python packages in Slicer's Python: what is missing or too old, and one plan to install them.

The engine runs in Slicer's own Python (``PythonSlicer``), so its packages live in Slicer's site-packages:
PyTorch from the PyTorch extension (PyTorch Utils), the others from pip. Nothing here imports them: versions are
read from the installed distributions' metadata.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from typing import Callable, Literal, Optional

__all__ = ["MINIMUM_TORCH", "ENGINE_PACKAGES", "NIFTI_PACKAGES", "Purpose", "DependencyPlan", "installedVersion",
           "planDependencies"]

#: The oldest PyTorch umlcore runs on.
MINIMUM_TORCH = (2, 1)
#: What every run needs (module -> pip name): umlcore's module-level imports; torch comes from the PyTorch extension.
ENGINE_PACKAGES = {"torch": "torch", "numpy": "numpy", "SimpleITK": "SimpleITK", "safetensors": "safetensors"}
#: What reading NIfTI files needs as well (folder mode on ``.nii`` / ``.nii.gz``; a run on scene nodes writes NRRD).
NIFTI_PACKAGES = {"nibabel": "nibabel"}

#: ``"nodes"``: a run on scene nodes; ``"files"``: folder mode, which may read NIfTI files.
Purpose = Literal["nodes", "files"]


@dataclass(frozen=True)
class DependencyPlan:
    """What the engine lacks in this Python.

    Attributes:
        torch: ``"ok"``, ``"missing"`` or ``"too-old"`` (older than :data:`MINIMUM_TORCH`).
        torchVersion: The installed PyTorch version (``""`` when missing).
        pip: pip names of the other missing packages.
    """

    torch: Literal["ok", "missing", "too-old"]
    torchVersion: str
    pip: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return self.torch == "ok" and not self.pip

    @property
    def torchRequirement(self) -> str:
        return ">=" + ".".join(map(str, MINIMUM_TORCH))

    def question(self) -> str:
        """One confirmation text for everything that would be installed."""
        parts = []
        if self.torch == "missing":
            parts.append("PyTorch (with the PyTorch extension; the download can be a few GB and take minutes)")
        elif self.torch == "too-old":
            parts.append(f"a newer PyTorch ({self.torchVersion} is installed, UML needs {self.torchRequirement}; "
                         "with the PyTorch extension)")
        if self.pip:
            parts.append("the Python package(s) " + ", ".join(self.pip) + " (with pip)")
        return "UML needs " + " and ".join(parts) + ". Install now?"

    def problem(self) -> str:
        """The one-line error when the engine cannot run: what is missing and the fix."""
        fixes, missing = [], []
        if self.torch == "missing":
            missing.append("torch")
            fixes.append("install PyTorch with the PyTorch extension (module 'PyTorch Utils')")
        elif self.torch == "too-old":
            missing.append(f"torch {self.torchRequirement} (found {self.torchVersion})")
            fixes.append(f"update PyTorch to {self.torchRequirement} in the module 'PyTorch Utils'")
        if self.pip:
            missing += self.pip
            fixes.append(f"run slicer.util.pip_install('{' '.join(self.pip)}')")
        return (f"Python package(s) {', '.join(missing)} missing for the UML engine: {' and '.join(fixes)} "
                "(the UML module offers to do this when you click Run UML)")


def installedVersion(distribution: str, version: Callable[[str], str] = importlib.metadata.version) -> Optional[str]:
    """The installed version of a distribution, or ``None``."""
    try:
        return version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(text: str) -> tuple[int, ...]:
    """``"2.13.0+cpu" -> (2, 13, 0)``, ``"2.1.0a0+git" -> (2, 1, 0)``."""
    return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3])


def planDependencies(purpose: Purpose = "nodes", find: Callable = importlib.util.find_spec,
                     version: Callable[[str], str] = importlib.metadata.version) -> DependencyPlan:
    """What is missing for ``purpose`` (``find`` and ``version`` look modules and distributions up; tests swap them)."""
    wanted = dict(ENGINE_PACKAGES, **(NIFTI_PACKAGES if purpose == "files" else {}))
    pip = tuple(p for module, p in wanted.items() if module != "torch" and find(module) is None)
    torchVersion = installedVersion("torch", version) if find("torch") is not None else None
    if torchVersion is None:
        return DependencyPlan("missing", "", pip)
    state = "ok" if _release(torchVersion)[:2] >= MINIMUM_TORCH else "too-old"
    return DependencyPlan(state, torchVersion, pip)
