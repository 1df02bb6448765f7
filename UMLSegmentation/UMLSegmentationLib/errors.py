"""Errors of the UML Slicer logic.

Every error carries one line a user can act on (the problem and the fix). The logic never imports
``umlcore`` at module level (that would import torch into Slicer before the user agreed to install it), so
these classes mirror umlcore's split: a problem with the input or the model is an :class:`InputError`, a
failure of the engine itself is an :class:`EngineError`, a run stopped on request is :class:`RunCancelled`.
"""

from __future__ import annotations

__all__ = ["UMLSegmentationError", "InputError", "EngineError", "RunCancelled"]


class UMLSegmentationError(Exception):
    """Base class of the module's errors; ``str(error)`` is the one-line message shown to the user.

    Args:
        message: The problem and the fix, in one line.
        details: Optional longer text for the log (for example the engine's stderr); never shown alone.
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class InputError(UMLSegmentationError, ValueError):
    """Bad input volume(s), model or option: the message names the problem and the fix."""


class EngineError(UMLSegmentationError, RuntimeError):
    """The UML engine could not be started, crashed, or wrote results that break its contract."""


class RunCancelled(UMLSegmentationError):
    """The run was cancelled; raise it from a progress callback to cancel ``process``."""

    def __init__(self, message: str = "cancelled by the user", details: str = "") -> None:
        super().__init__(message, details)
