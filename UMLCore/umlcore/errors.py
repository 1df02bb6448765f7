"""Exceptions of umlcore. Anything a user can fix is a :class:`UMLInputError` (exit code 2 in the CLI)."""

from __future__ import annotations

__all__ = ["UMLError", "UMLInputError", "BundleError", "CancelledError"]


class UMLError(Exception):
    """Base class of umlcore's own errors."""


class UMLInputError(UMLError, ValueError):
    """Bad input or usage: the message names the problem and the fix."""


class BundleError(UMLInputError):
    """A model bundle that cannot be used (missing, tampered, wrong schema, ...)."""


class CancelledError(UMLError):
    """The caller's cancel check asked the run to stop."""
