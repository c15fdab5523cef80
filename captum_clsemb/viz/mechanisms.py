r"""Plots of the mechanistic analyses (paper Figs. 2, 3 and 4), returning matplotlib Figures.

Every function takes the dictionaries returned by :mod:`captum_clsemb.analysis` (tensors or
arrays), draws on a new :class:`matplotlib.figure.Figure` (no pyplot state, so it works
headless) or on a given ``ax``, and returns the Figure. Blocks are numbered from 1 on the
x axis, as in the paper.

Examples::

    >>> from captum_clsemb.analysis import class_similarity_change_rate
    >>> from captum_clsemb.viz.mechanisms import plot_class_similarity_change
    >>> fig = plot_class_similarity_change(class_similarity_change_rate(model, loader))
    >>> fig.savefig("fig3b.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from captum_clsemb.errors import InputValidationError
from captum_clsemb.viz._common import _axes, _block_axis, _blocks, _bounds, _np, draw_band, significant

# Fig. 2 lives in viz.identifiability; still importable from here, documented there.
from captum_clsemb.viz.identifiability import plot_identifiability_curves  # noqa: F401

_LAYER_COLORS = {"attn": "tab:orange", "mlp": "tab:blue"}
_GROUP_STYLES = {"cls": "-", "image": "--", "all": ":"}
_GROUP_NAMES = {"cls": "class token", "image": "image tokens", "all": "all tokens"}


def _group_name(group: str) -> str:
    return _GROUP_NAMES.get(group, f"{group} tokens")


_MATCH_COLORS = {"attn": "tab:orange", "mlp": "tab:blue", "residual": "tab:gray", "composite": "tab:green"}


def plot_class_context(
    result: Mapping,
    stat: str = "mean",
    ax: Axes | None = None,
    title: str | None = None,
    ci: Mapping | None = None,
    test: object | None = None,
    alpha: float = 0.05,
) -> Figure:
    r"""Identifiability of class- vs context-labelled tokens per block (Fig. 3a).

    Args:
        result: output of :func:`~captum_clsemb.analysis.class_context_identifiability`
            (``{"class": {stat: (B,)}, "context": {...}}``), or ``{"class": (B,), "context": (B,)}``
            (e.g. ``ClassContextComparison.mean``).
        stat: ``"mean"`` (default) or ``"rate"``.
        ax, title: see :func:`plot_identifiability_curves`.
        ci: ``{"class": interval, "context": interval}`` drawn as shaded bands (e.g.
            ``ClassContextComparison.ci``). Optional.
        test: a per-block test of class > context (e.g. ``ClassContextComparison.test``); a
            star marks the blocks where it rejects at ``alpha``. Optional.
        alpha: level of the stars (adjusted p-values when present). Default: 0.05.
    Returns:
        the Figure.
    """
    if stat not in ("mean", "rate"):
        raise InputValidationError(f"stat must be 'mean' or 'rate', got {stat!r}")
    fig, ax = _axes(ax)
    values = {}
    for group, color in (("class", "tab:red"), ("context", "tab:purple")):
        entry = result[group]
        v = _np(entry[stat] if isinstance(entry, Mapping) else entry)
        values[group] = v
        ax.plot(_blocks(len(v)), v, marker="o", color=color, label=f"{group}-labelled tokens")
        if ci is not None and group in ci:
            draw_band(ax, _blocks(len(v)), ci[group], color)
    if test is not None:
        sig = significant(test, alpha)
        v = values["class"]
        if sig.shape == v.shape and sig.any():
            ax.plot(_blocks(len(v))[sig], v[sig], linestyle="none", marker="*", markersize=10, color="tab:red",
                    markeredgecolor="black", markeredgewidth=0.4, label=f"class > context (p < {alpha:g}, BH)")  # fmt: skip
    _block_axis(ax)
    ax.set_ylabel("identifiability rate (%)" if stat == "rate" else "mean identifiability")
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def plot_class_similarity_change(
    rates: Mapping, ax: Axes | None = None, title: str | None = None, ci: Mapping | None = None
) -> Figure:
    r"""Class similarity change rate of attention and MLP sub-layers per block (Fig. 3b).

    Args:
        rates: output of :func:`~captum_clsemb.analysis.class_similarity_change_rate`,
            ``{"attn": {"cls", "image"}, "mlp": {...}}``.
        ax, title: see :func:`plot_identifiability_curves`.
        ci: ``{layer: {group: interval}}`` (e.g. 95% bootstrap intervals over images) drawn
            as shaded bands. Optional.
    Returns:
        the Figure; one line per layer and token group, a dotted line at 50 % (chance).
    """
    fig, ax = _axes(ax, figsize=(7.0, 3.8))
    n = 0
    for layer, groups in rates.items():
        for group, values in groups.items():
            v = _np(values)
            n = len(v)
            ax.plot(_blocks(n), v, marker="o", color=_LAYER_COLORS.get(layer), linestyle=_GROUP_STYLES.get(group, "-"),
                    label=f"{layer}, {_group_name(group)}")  # fmt: skip
            band = (ci or {}).get(layer, {}).get(group)
            if band is not None:
                draw_band(ax, _blocks(n), band, _LAYER_COLORS.get(layer))
    ax.axhline(50.0, color="black", linewidth=0.8, linestyle=":", label="chance (50%)")
    _block_axis(ax)
    ax.set_ylabel("class similarity change rate (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        ax.set_title(title)
    return fig


def plot_residual_match(
    match: Mapping,
    group: str = "all",
    ax: Axes | None = None,
    title: str | None = None,
    ci: Mapping | None = None,
) -> Figure:
    r"""Stacked bars: share of tokens whose residual top-1 matches each component (Fig. 3c).

    Args:
        match: output of :func:`~captum_clsemb.analysis.residual_match_rate` (exclusive
            categories, so bars reach 100 %), or one group of it ``{category: (blocks,)}``.
        group: token group to draw when ``match`` holds several. Default: ``"all"``.
        ax, title: see :func:`plot_identifiability_curves`.
        ci: ``{category: interval}`` of each category's share (e.g. 95% bootstrap intervals
            over images), drawn as error bars at the upper edge of the category's segment.
            Optional.
    Returns:
        the Figure.
    """
    shares = match[group] if group in match and isinstance(match[group], Mapping) else match
    fig, ax = _axes(ax)
    bottom = None
    for category, values in shares.items():
        v = _np(values)
        x = _blocks(len(v))
        bottom = np.zeros_like(v) if bottom is None else bottom
        ax.bar(x, v, bottom=bottom, color=_MATCH_COLORS.get(category), label=category)
        if ci is not None and category in ci:
            low, high = _bounds(ci[category])
            top = bottom + v
            ax.errorbar(x, top, yerr=np.vstack([np.clip(v - low, 0, None), np.clip(high - v, 0, None)]),
                        fmt="none", ecolor="black", elinewidth=0.8, capsize=2)  # fmt: skip
        bottom = bottom + v
    _block_axis(ax)
    ax.set_ylabel("tokens (%)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title)
    return fig


def plot_class_value_agreement(
    agreement: Mapping | object,
    baseline: Mapping | object | None = None,
    layers: Sequence[str] | None = None,
    title: str | None = None,
    tests: Mapping | None = None,
    alpha: float = 0.05,
) -> Figure:
    r"""Class-value agreement per block, trained vs random init, as box plots (Fig. 4a).

    Args:
        agreement: ``{layer: (blocks, classes)}`` from
            :meth:`~captum_clsemb.analysis.ValueVectorProjector.class_value_agreement`
            (e.g. ``{"attn": ..., "mlp": ...}``), or one (blocks, classes) array.
        baseline: the same for a random-init model (``vvp.random_baseline()``). Optional.
        layers: order of the layers (one panel each). Default: the mapping's order.
        title: optional figure title.
        tests: ``{layer: per-block test}`` of trained > random init (e.g.
            :func:`~captum_clsemb.stats.wilcoxon_signed_rank` paired by class); a star above
            the boxes marks the blocks where it rejects at ``alpha``, as the paper's Fig. 4a.
            Optional.
        alpha: level of the stars (adjusted p-values when present). Default: 0.05.
    Returns:
        the Figure with one panel per layer; per block, a box over classes for the trained
        model (colour) and, if given, the random model (gray) to its right.
    """
    if not isinstance(agreement, Mapping):
        agreement = {"": agreement}
        baseline = None if baseline is None else {"": baseline}
    layers = list(layers) if layers is not None else list(agreement)
    fig = Figure(figsize=(5.0 * len(layers), 4.0), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer in zip(axes, layers):
        trained = _np(agreement[layer])
        x = _blocks(trained.shape[0])
        offset = 0.0 if baseline is None else 0.2
        box = ax.boxplot(
            list(trained),
            positions=x - offset,
            widths=0.35,
            patch_artist=True,
            showfliers=False,
            medianprops={"color": "black", "gid": "median"},
        )
        for patch in box["boxes"]:
            patch.set_facecolor(_LAYER_COLORS.get(layer, "tab:blue"))
        handles, labels = [box["boxes"][0]], ["trained"]
        if baseline is not None:
            rand = _np(baseline[layer])
            rbox = ax.boxplot(
                list(rand),
                positions=x + offset,
                widths=0.35,
                patch_artist=True,
                showfliers=False,
                medianprops={"color": "black", "gid": "median"},
            )
            for patch in rbox["boxes"]:
                patch.set_facecolor("lightgray")
            handles.append(rbox["boxes"][0])
            labels.append("random init")
        test = (tests or {}).get(layer)
        if test is not None:
            sig = significant(test, alpha)
            if sig.shape == x.shape and sig.any():
                # above the upper whisker of the block's boxes (outliers are not drawn)
                top = _whisker_top(trained)
                if baseline is not None:
                    top = np.fmax(top, _whisker_top(_np(baseline[layer])))
                low = np.nanmin(trained)
                pad = 0.05 * (np.nanmax(top) - low + 1e-12)
                ax.plot(x[sig], top[sig] + pad, linestyle="none", marker="*", markersize=9, color="black")
                handles.append(ax.lines[-1])
                labels.append(f"trained > random init (p < {alpha:g}, BH)")
        ax.set_xticks(x, [str(i) for i in x])
        ax.set_xlabel("block")  # fixed ticks at the box positions
        ax.set_ylabel("class-value agreement (max cosine)")
        if layer:
            ax.set_title(layer)
        ax.legend(
            handles,
            labels,
            fontsize="small",
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            ncol=3,
            frameon=False,
        )
    if title:
        fig.suptitle(title)
    return fig


def _whisker_top(values: np.ndarray) -> np.ndarray:
    """Per row, the end of the upper whisker of a box plot (largest value within Q3 + 1.5 IQR)."""
    out = []
    for row in values:
        row = row[np.isfinite(row)]
        q1, q3 = np.percentile(row, [25, 75])
        out.append(row[row <= q3 + 1.5 * (q3 - q1)].max())
    return np.asarray(out)


def plot_key_value_agreement(
    rates: Mapping, groups: Sequence[str] = ("image", "cls"), split: bool = False, ax: Axes | None = None,
    title: str | None = None, ci: Mapping | None = None, baseline: Mapping | None = None,
    baseline_label: str = "random baseline",
) -> Figure:  # fmt: skip
    r"""Key-value agreement rate per block for attention and MLP (Fig. 4b).

    Args:
        rates: ``{layer: rates}`` with ``rates`` from
            :meth:`~captum_clsemb.analysis.ValueVectorProjector.key_value_agreement_rate`,
            e.g. ``{"attn": vvp.key_value_agreement_rate(loader, layer="attn"), "mlp": ...}``.
        groups: token groups to draw (``"image"``, ``"cls"``, ``"all"``), if present.
        split: draw correctly and wrongly classified images separately (solid / dotted).
        ax, title: see :func:`plot_identifiability_curves`.
        ci: ``{layer: {key: interval}}`` for the drawn keys (``group`` or ``group_correct``
            ...), drawn as shaded bands. Optional.
        baseline: ``{layer: {group: (blocks,)}}`` rates of a random baseline (e.g. the
            agreement with a randomly drawn other class), drawn thin and dash-dotted in the
            layer's colour. Optional.
        baseline_label: legend text of the baseline. Default: ``"random baseline"``.
    Returns:
        the Figure.
    """
    fig, ax = _axes(ax, figsize=(7.5, 3.8))
    for layer, r in rates.items():
        for group in groups:
            keys = (
                [(f"{group}_correct", "correct", "-"), (f"{group}_incorrect", "misclassified", ":")]
                if split
                else [(group, "", "-")]
            )
            for key, suffix, style in keys:
                if key not in r:
                    continue
                v = _np(r[key])
                marker = "o" if group != "cls" else "s"
                label = f"{layer}, {_group_name(group)}" + (f", {suffix}" if suffix else "")
                ax.plot(
                    _blocks(len(v)),
                    v,
                    marker=marker,
                    color=_LAYER_COLORS.get(layer),
                    linestyle=style,
                    label=label,
                )
                band = (ci or {}).get(layer, {}).get(key)
                if band is not None:
                    draw_band(ax, _blocks(len(v)), band, _LAYER_COLORS.get(layer))
            base = (baseline or {}).get(layer, {}).get(group)
            if base is not None:
                b = _np(base)
                ax.plot(_blocks(len(b)), b, color=_LAYER_COLORS.get(layer), linestyle="-.", linewidth=1,
                        label=f"{layer}, {_group_name(group)}: {baseline_label}")  # fmt: skip
    _block_axis(ax)
    ax.set_ylabel("key-value agreement rate (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        ax.set_title(title)
    return fig


__all__ = [
    "plot_class_context",
    "plot_class_similarity_change",
    "plot_residual_match",
    "plot_class_value_agreement",
    "plot_key_value_agreement",
]
