"""Small helpers shared by the plotting modules (not public API)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _np(values: object) -> np.ndarray:
    """A float array; None entries (undefined numbers from JSON-ready dicts) become NaN."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()  # type: ignore[union-attr]
    if values is None:
        return np.asarray(np.nan)
    return np.asarray(values, dtype=float)


def _axes(ax: Axes | None, figsize: tuple[float, float] = (5.0, 3.5)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _block_axis(ax: Axes) -> None:
    ax.set_xlabel("block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _blocks(n: int) -> np.ndarray:
    return np.arange(1, n + 1)


def _pick_stat(curves: Mapping, stat: str) -> Mapping:
    """Accept either {group: values} or a summary {"mean": {...}, "rate": {...}}."""
    if stat in curves and isinstance(curves[stat], Mapping):
        return curves[stat]
    return curves


def captum_cmap(sign: str, cmap: object = None) -> tuple[object, float, float]:
    """The colour map and value range Captum's ``visualize_image_attr`` uses for ``sign``."""
    from matplotlib.colors import LinearSegmentedColormap

    if sign == "all":
        default: object = LinearSegmentedColormap.from_list("RdWhGn", ["red", "white", "green"])
        vmin = -1.0
    else:
        default = {"positive": "Greens", "negative": "Reds", "absolute_value": "Blues"}.get(sign, "Greens")
        vmin = 0.0
    return (cmap if cmap is not None else default), vmin, 1.0


def captum_scale_label(sign: str, outlier_perc: float) -> str:
    """How Captum normalises each panel, for a colour bar label."""
    span = "[-1, 1]" if sign == "all" else "[0, 1]"
    return (
        f"attribution / panel scale, clipped to {span}\n(scale: value where sorted |values| reach "
        f"{100 - outlier_perc:g}% of their sum)"
    )


def add_colorbar(
    fig: Figure, axes: object, cmap: object, vmin: float, vmax: float, label: str, **kwargs: object
) -> object:
    """One colour bar for a group of panels that share ``cmap`` and the range ``[vmin, vmax]``."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=cmap)
    cbar = fig.colorbar(mappable, ax=axes, **kwargs)
    cbar.set_label(label, fontsize=7)
    cbar.ax.tick_params(labelsize=7)
    return cbar


def _bounds(ci: object) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of a :class:`~captum_clsemb.stats.ConfidenceInterval` or a ``(low, high)`` pair."""
    if hasattr(ci, "low") and hasattr(ci, "high"):
        return _np(ci.low), _np(ci.high)  # type: ignore[union-attr]
    low, high = ci  # type: ignore[misc]
    return _np(low), _np(high)


def draw_band(ax: Axes, x: np.ndarray, ci: object, color: object, alpha: float = 0.18) -> None:
    """A shaded confidence band (e.g. 95% bootstrap interval) around a curve."""
    low, high = _bounds(ci)
    ax.fill_between(x, low, high, color=color, alpha=alpha, linewidth=0)


def significant(test: object, alpha: float) -> np.ndarray:
    """Boolean per block: the test rejects at ``alpha`` (adjusted p-values when present)."""
    return np.atleast_1d(np.asarray(test.significant(alpha), dtype=bool))  # type: ignore[attr-defined]
