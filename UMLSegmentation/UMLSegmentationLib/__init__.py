"""Qt-free logic of the UML Slicer module (imports numpy, vtk, slicer MRML classes and slicer.util only).

Runs under the full 3D Slicer application and under the PyPI package ``slicer-core``. ``umlcore`` (and so
torch) is never imported at import time: the engine runs out of process.
"""

from .errors import EngineError, InputError, RunCancelled, UMLSegmentationError
from .engine import ProgressEvent
from .models import ModelInfo, SegmentInfo, listModels, readModelInfo, resolveModel, validateModel
from .outputs import OutputNodes
from .logic import PendingRun, UMLResult, UMLSegmentationLogic

__all__ = [
    "UMLSegmentationLogic",
    "UMLResult",
    "PendingRun",
    "OutputNodes",
    "ProgressEvent",
    "ModelInfo",
    "SegmentInfo",
    "listModels",
    "readModelInfo",
    "resolveModel",
    "validateModel",
    "UMLSegmentationError",
    "InputError",
    "EngineError",
    "RunCancelled",
]
