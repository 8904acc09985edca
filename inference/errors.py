"""Errors of prediction and explanation: each names the file and what did not match."""

from __future__ import annotations


class PredictError(ValueError):
    """The model or the input cannot be used; the message says which file and why."""


class ModelInputMismatch(PredictError):
    """The input is valid on its own but is not what the model was trained on.

    Raised for another task (a CSV for an imaging model), other features or columns, or
    another image type (a CT series for a radiograph model).
    """
