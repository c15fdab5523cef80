"""Exceptions raised by captum_clsemb. Each message names the problem and the fix."""

from __future__ import annotations


class UnsupportedModelError(TypeError):
    """The model is not a ViT family that an adapter can decompose exactly."""


class InputValidationError(ValueError):
    """Inputs, targets or options do not fit the model (shape, size, dtype, range, batch)."""
