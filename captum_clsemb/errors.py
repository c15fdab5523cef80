"""Exceptions raised by captum_clsemb. Each message names the problem and the fix."""

from __future__ import annotations


class UnsupportedModelError(TypeError):
    """The model is not a ViT family that an adapter can decompose exactly."""


class InputValidationError(ValueError):
    """Inputs, targets or options do not fit the model (shape, size, dtype, range, batch)."""


class ModelLoadError(InputValidationError):
    """A model could not be loaded: unknown name, no network, unreadable or mismatched weights.

    Raised by :func:`captum_clsemb.load_model`; the message says how to load the model
    without the hub (a local checkpoint or model folder, or random weights).
    """


class NonFiniteInputError(InputValidationError):
    """Some input images contain NaN or infinite values.

    ``indices`` lists the offending examples (positions in the batch that was checked), so
    that a caller can drop them and retry.
    """

    def __init__(self, message: str, indices: list[int]) -> None:
        super().__init__(message)
        self.indices = list(indices)
