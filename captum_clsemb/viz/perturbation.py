"""Perturbation curves of several explanation methods with confidence bands (paper Sec. 7-8)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from captum_clsemb.metrics.auc import MODES
from captum_clsemb.metrics.compare import ComparisonResults
from captum_clsemb.viz._common import _np, draw_band

_BETTER = {"negative": "higher AUC is better", "positive": "lower AUC is better"}


def plot_perturbation_curves(
    results: ComparisonResults,
    ci: Mapping[str, Mapping[str, object]] | None = None,
    aucs: Mapping[str, Mapping[str, object]] | None = None,
    title: str | None = None,
) -> Figure:
    r"""Mean perturbation curves per method, negative test (left) and positive test (right), with bands.

    Args:
        results: output of :func:`~captum_clsemb.metrics.compare_explanations`.
        ci: ``{method: {mode: interval}}`` of the mean curve at every removal fraction (e.g.
            :func:`~captum_clsemb.stats.bootstrap_ci` of ``results.curves[m][mode]``),
            drawn as shaded bands. Optional.
        aucs: ``{method: {mode: interval}}`` of the mean AUC, written in the legend as
            ``AUC [low, high]``; without it the legend shows the mean trapezoid AUC.
        title: figure title. Default: a description of the run.
    Returns:
        a ``matplotlib.figure.Figure`` (not attached to pyplot).
    """
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    x = _np(results.fractions) * 100
    for ax, mode in zip(axes, MODES):
        for i, m in enumerate(results.methods):
            color = f"C{i % 10}"
            entry = (aucs or {}).get(m, {}).get(mode)
            if entry is not None:
                low, high = (_np(v).item() for v in (entry.low, entry.high))
                bounds = f" [{low:.1f}, {high:.1f}]" if np.isfinite([low, high]).all() else ""
                label = f"{m} ({_np(entry.estimate).item():.1f}{bounds})"
            else:
                label = f"{m} ({results.auc(m, mode):.1f})"
            ax.plot(x, _np(results.mean_curve(m, mode)), marker="o", ms=3, color=color, label=label)
            band = (ci or {}).get(m, {}).get(mode)
            if band is not None:
                draw_band(ax, x, band, color, alpha=0.12)
        ax.set_title(f"{mode.capitalize()} perturbation ({_BETTER[mode]})")
        ax.set_xlabel("% of tokens removed" if results.protocol == "tokens" else "% of pixels removed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="method (AUC [95% CI])" if aucs else "method (AUC)", title_fontsize=7)
    axes[0].set_ylabel(results.score)
    fig.suptitle(
        title
        or f"{results.num_images} images, explanations of the {results.explain_target} class, "
        f"clean {results.score} {results.clean_score:.3f}"
    )
    return fig


__all__ = ["plot_perturbation_curves"]
