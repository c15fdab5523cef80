"""Small helpers shared by the plotting modules (not public API)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _np(values: object) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()  # type: ignore[union-attr]
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
