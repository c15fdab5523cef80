"""Several models on one axis over normalised depth (paper Fig. 2), with significance markers."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from captum_clsemb.analysis.model_comparison import ModelComparison
from captum_clsemb.errors import InputValidationError
from captum_clsemb.stats import ConfidenceInterval, TestResult
from captum_clsemb.viz._common import _axes, _bounds, _np, draw_band

_GROUP_LABELS = {"image": "image tokens", "cls": "class token"}
_GROUP_STYLES = {"image": ("o", "-"), "cls": ("s", "--")}


def plot_model_curves(
    curves: Mapping[str, Mapping[str, object]],
    depth: object | None = None,
    ci: Mapping[str, Mapping[str, ConfidenceInterval]] | None = None,
    baselines: Mapping[str, Mapping[str, object]] | None = None,
    tests: Mapping[str, Mapping[str, TestResult]] | None = None,
    alpha: float = 0.05,
    ylabel: str = "mean identifiability",
    ax: Axes | None = None,
    title: str | None = None,
    chance: float | None = None,
    xlabel: str | None = None,
    star_label: str | None = None,
    baseline_ci: Mapping[str, Mapping[str, ConfidenceInterval]] | None = None,
) -> Figure:
    r"""Curves of several models over normalised depth on one axis, with bands and stars.

    Args:
        curves: ``{model: {group: (T,) values}}``, groups ``"image"`` / ``"cls"`` (or any
            name), all on the same grid.
        depth: (T,) x positions (normalised depth in (0, 1]). Default: ``1/T, ..., 1``.
        ci: ``{model: {group: ConfidenceInterval}}`` (or ``(low, high)`` pairs) drawn as shaded
            bands. Optional.
        baselines: ``{model: {group: (T,)}}`` (random-init copies), drawn thin and dotted in
            the model's colour. Optional.
        tests: ``{model: {group: TestResult}}`` per grid point; a star marks the points
            where the test rejects at ``alpha`` (on BH-adjusted p-values when present).
        alpha: significance level of the stars. Default: 0.05.
        ylabel: y-axis label.
        ax: axes to draw on. Default: a new figure.
        title: optional axes title.
        chance: draw the chance level as a dotted black line. Optional.
        xlabel: x-axis label. Default: normalised depth (or "block" when ``depth`` holds
            block numbers, i.e. values above 1).
        star_label: legend entry of the stars. Default: trained > random init.
        baseline_ci: the same as ``ci`` for the baselines, drawn as lighter bands. Optional.

    One model is drawn with one colour per group; several models with one colour per model
    (groups by marker and line style). Baselines are dotted with small markers of their group.

    Returns:
        the Figure.
    """
    if not curves:
        raise InputValidationError("curves are empty: give at least one model")
    fig, ax = _axes(ax, figsize=(6.0, 4.0))
    span = []
    for m, (model, groups) in enumerate(curves.items()):
        for g, (group, values) in enumerate(groups.items()):
            # one colour per model from the style's cycle; a single model: one per group
            color = f"C{(g if len(curves) == 1 else m) % 10}"
            v = _np(values)
            x = _np(depth) if depth is not None else np.arange(1, len(v) + 1) / len(v)
            if x.shape != v.shape:
                raise InputValidationError(f"{model}/{group}: {len(v)} values but {len(x)} depth positions")
            marker, style = _GROUP_STYLES.get(group, ("o", "-"))
            label = f"{model}, {_GROUP_LABELS.get(group, group)}"
            ax.plot(x, v, marker=marker, markersize=4, linestyle=style, color=color, label=label)
            span.append(v)
            band = (ci or {}).get(model, {}).get(group)
            if band is not None:
                draw_band(ax, x, band, color)
                span += list(_bounds(band))
            base = (baselines or {}).get(model, {}).get(group)
            if base is not None:
                b = _np(base)
                ax.plot(x, b, linestyle=":", linewidth=1.2, color=color, marker=marker, markersize=2.5,
                        label=f"{label} (random init)")  # fmt: skip
                span.append(b)
                bband = (baseline_ci or {}).get(model, {}).get(group)
                if bband is not None:
                    draw_band(ax, x, bband, color, alpha=0.08)
            test = (tests or {}).get(model, {}).get(group)
            if test is not None:
                sig = np.atleast_1d(test.significant(alpha))
                if sig.shape != v.shape:
                    raise InputValidationError(
                        f"{model}/{group}: the tests hold {sig.size} points, the curve {v.size}"
                    )
                if sig.any():
                    ax.plot(x[sig], v[sig], linestyle="none", marker="*", markersize=9, color=color,
                            markeredgecolor="black", markeredgewidth=0.4)  # fmt: skip
    if chance is not None:
        ax.axhline(chance, linestyle=":", color="black", linewidth=1, label="chance")
        span.append(np.array([chance], dtype=float))
    finite = np.concatenate([s[np.isfinite(s)] for s in span]) if span else np.array([])
    if finite.size and finite.min() >= 0 and finite.max() <= 1:
        ax.set_ylim(0, 1.03)
    x_all = _np(depth) if depth is not None else None
    if x_all is not None and x_all.size and x_all.max() > 1:  # block numbers
        ax.set_xlabel(xlabel or "block")
        ax.set_xlim(0.5, x_all.max() + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.set_xlabel(xlabel or "normalised depth (block / number of blocks)")
        ax.set_xlim(0, 1.02)
    ax.set_ylabel(ylabel)
    if tests:
        ax.plot([], [], linestyle="none", marker="*", markersize=9, color="gray", markeredgecolor="black",
                markeredgewidth=0.4, label=star_label or f"trained > random init (p < {alpha:g}, BH)")  # fmt: skip
    ax.legend(fontsize="x-small", frameon=False)
    if title:
        ax.set_title(title)
    return fig


def plot_model_comparison(
    comparison: ModelComparison,
    stat: str = "mean",
    groups: tuple[str, ...] = ("image", "cls"),
    show_ci: bool = True,
    show_baselines: bool = True,
    alpha: float = 0.05,
    ax: Axes | None = None,
    title: str | None = None,
    chance: float | None = None,
) -> Figure:
    r"""Fig. 2 for several models: curves over normalised depth with 95% bands and stars.

    Args:
        comparison: a :class:`~captum_clsemb.analysis.ModelComparison`.
        stat: ``"mean"`` (mean identifiability, default; stars from the trained-vs-random
            tests) or ``"rate"`` (identifiability rate in percent; no stars).
        groups: token groups to draw, if present. Default: image tokens and class token.
        show_ci: shaded percentile bootstrap bands. Default: True.
        show_baselines: the random-init curves, dotted. Default: True.
        alpha: level of the significance stars (BH-adjusted p-values). Default: 0.05.
        ax, title, chance: see :func:`plot_model_curves`.
    Returns:
        the Figure.
    """
    if stat not in ("mean", "rate"):
        raise InputValidationError(f"stat must be 'mean' or 'rate', got {stat!r}")

    def pick(d: Mapping) -> dict:
        return {m: {g: v for g, v in per[stat].items() if g in groups} for m, per in d.items()}

    return plot_model_curves(
        pick(comparison.curves),
        depth=comparison.depth,
        ci=pick(comparison.curve_ci) if show_ci else None,
        baselines=pick(comparison.baseline_curves) if show_baselines else None,
        tests={m: {g: r for g, r in t.items() if g in groups} for m, t in comparison.tests.items()}
        if stat == "mean"
        else None,
        alpha=alpha,
        ylabel="mean identifiability" if stat == "mean" else "identifiability rate (%)",
        ax=ax,
        title=title,
        chance=chance,
    )
