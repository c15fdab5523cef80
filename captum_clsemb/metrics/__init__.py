r"""Perturbation metrics in the style of ``captum.metrics``: token- and pixel-removal AUC,
baseline rankings (random, linear probes) and a comparison runner for explanation methods."""

from captum_clsemb.metrics.auc import DEFAULT_FRACTIONS, authors_auc, trapezoid_auc
from captum_clsemb.metrics.compare import (
    ComparisonResults,
    compare_explanations,
    default_methods,
    plot_curves,
    to_csv,
    to_markdown,
)
from captum_clsemb.metrics.pixel_removal import pixel_removal_auc
from captum_clsemb.metrics.rankings import (
    LinearProbeRanking,
    RandomRanking,
    random_attributions,
    ridge_from_stats,
)
from captum_clsemb.metrics.token_removal import token_removal_auc

__all__ = [
    "DEFAULT_FRACTIONS",
    "token_removal_auc",
    "pixel_removal_auc",
    "trapezoid_auc",
    "authors_auc",
    "random_attributions",
    "RandomRanking",
    "LinearProbeRanking",
    "ridge_from_stats",
    "compare_explanations",
    "default_methods",
    "ComparisonResults",
    "to_markdown",
    "to_csv",
    "plot_curves",
]
