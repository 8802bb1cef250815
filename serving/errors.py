"""Errors of the model repository (kept apart so light importers need not load onnx)."""

from __future__ import annotations


class RepositoryError(ValueError):
    """A repository operation was refused; the message names the value, the rule and the fix.

    Raised before anything already published is changed: a failed publish, verify or retention
    leaves every existing version as it was.
    """
