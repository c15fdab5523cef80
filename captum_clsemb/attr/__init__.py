"""Captum-style attribution classes."""

from captum_clsemb.attr.blockwise_identifiability import (
    BlockwiseIdentifiability,
    identifiability_rate,
    identifiability_scores,
    images_with_identifiable_token,
    mean_identifiability,
)

__all__ = [
    "BlockwiseIdentifiability",
    "identifiability_scores",
    "identifiability_rate",
    "images_with_identifiable_token",
    "mean_identifiability",
]
