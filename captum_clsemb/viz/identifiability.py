"""Figures for class identifiability: per-block curves (paper Fig. 2) and token maps over images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from captum_clsemb.errors import InputValidationError
from captum_clsemb.viz._common import _axes, _block_axis, _blocks, _np, _pick_stat


def to_hwc_image(
    image: Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """(3, H, W) tensor (optionally normalised) -> (H, W, 3) float array in [0, 1] for Captum's visualization."""
    x = image.detach().cpu().float()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    else:
        x = (x - x.min()) / (x.max() - x.min() + 1e-12)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


_TOKEN_GROUPS = ("cls", "image", "all")


def _curve_label(name: str) -> str:
    return f"{name} tokens" if name in _TOKEN_GROUPS else name


def plot_identifiability_curves(
    curves: Mapping,
    baseline: Mapping | None = None,
    stat: str = "mean",
    chance: float | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    r"""Identifiability per block, one line per token group or condition (paper Fig. 2).

    Args:
        curves: name -> per-block values, e.g. ``{"cls": (blocks,), "image": (blocks,)}`` from
            :meth:`~captum_clsemb.attr.BlockwiseIdentifiability.mean_identifiability`, or the
            summary of :func:`~captum_clsemb.analysis.identifiability_summary`, read at ``stat``.
            The groups ``cls``, ``image`` and ``all`` are labelled "... tokens"; other names
            (e.g. conditions of an intervention) are used as they are.
        baseline: the same for a random-init model, drawn dashed in gray. Optional.
        stat: ``"mean"`` (scores, default) or ``"rate"`` (percent), for summaries.
        chance: draw the expected value of a random ranking as a dotted line (for mean
            identifiability :math:`0.5 + 0.5/|C|`; for the rate :math:`100/|C|`). Optional.
        ax: axes to draw on. Default: a new figure.
        title: optional axes title.
    Returns:
        the Figure.
    """
    if stat not in ("mean", "rate"):
        raise InputValidationError(f"stat must be 'mean' or 'rate', got {stat!r}")
    fig, ax = _axes(ax)
    for name, values in _pick_stat(curves, stat).items():
        v = _np(values)
        ax.plot(_blocks(len(v)), v, marker="o", label=_curve_label(name))
    if baseline is not None:
        for name, values in _pick_stat(baseline, stat).items():
            v = _np(values)
            ax.plot(
                _blocks(len(v)), v, color="gray", linestyle="--", label=f"{_curve_label(name)} (random init)"
            )
    if chance is not None:
        ax.axhline(chance, linestyle=":", color="black", linewidth=1, label="chance")
    _block_axis(ax)
    if stat == "rate":
        ax.set_ylabel("identifiability rate (%)")
    else:
        ax.set_ylabel("mean identifiability")
        ax.set_ylim(0, 1.02)
    ax.legend(fontsize="small", frameon=False)
    if title:
        ax.set_title(title)
    return fig


def plot_token_maps(
    scores: Tensor,
    images: Tensor,
    grid: tuple[int, int],
    num_prefix_tokens: int,
    blocks: Sequence[int],
    titles: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scale: str = "absolute",
    colorbar: bool = True,
    cmap: str = "Greens",
    alpha_overlay: float = 0.6,
) -> Figure:
    r"""Identifiability of every image token over the image, for chosen blocks.

    Each panel blends the grayscale image with the token scores on the patch grid (nearest
    upsampling, :meth:`captum.attr.LayerAttribution.interpolate`), as Captum's
    ``blended_heat_map``.

    Args:
        scores: (N, num_blocks, T) identifiability scores.
        images: (N, 3, H, W) the input images (normalised with ``mean``/``std`` if given).
        grid: (h, w) patch grid.
        num_prefix_tokens: tokens to drop before reshaping to the grid.
        blocks: block indices to show (columns).
        titles: one row title per image.
        mean, std: the preprocessing's normalisation, to undo it on ``images``.
        scale: ``"absolute"`` (default): every panel on the same fixed scale 0..1 of the
            score :math:`r = 1 - \mathrm{rank}/|C|`, so that panels and blocks compare
            directly; ``"panel"``: each panel drawn by Captum's ``visualize_image_attr``
            (``sign="positive"``, ``outlier_perc=0``), i.e. divided by its own maximum.
        colorbar: add one colour bar for all panels, labelled with the scale. Default: True.
        cmap: colour map of the scores. Default: ``"Greens"`` (Captum's for positive maps).
        alpha_overlay: opacity of the scores over the image. Default: 0.6.
    Returns:
        a matplotlib Figure with N rows and len(blocks) + 1 columns (and, with
        ``colorbar``, the colour bar's axes last).
    """
    from captum.attr import LayerAttribution
    from captum.attr import visualization as viz

    from captum_clsemb.viz._common import add_colorbar

    if scale not in ("absolute", "panel"):
        raise InputValidationError(f"scale must be 'absolute' or 'panel', got {scale!r}")
    n, cols = scores.shape[0], len(blocks) + 1
    fig = Figure(figsize=(1.9 * cols + (0.6 if colorbar else 0.0), 1.9 * n))
    h, w = grid
    size = tuple(images.shape[-2:])
    panels = []
    for i in range(n):
        img = to_hwc_image(images[i], mean, std)
        ax = fig.add_subplot(n, cols, i * cols + 1)
        ax.imshow(img)
        ax.set_axis_off()
        ax.set_title(titles[i] if titles else "", fontsize=7)
        for j, b in enumerate(blocks):
            tok = scores[i, b, num_prefix_tokens:].reshape(1, 1, h, w).float()
            up = LayerAttribution.interpolate(tok, size, "nearest")[0, 0].numpy()
            ax = fig.add_subplot(n, cols, i * cols + j + 2)
            panels.append(ax)
            if scale == "panel":
                # outlier_perc=0: Captum scales each panel by its maximum score (no clipping).
                viz.visualize_image_attr(up[..., None], img, method="blended_heat_map", sign="positive",
                                         plt_fig_axis=(fig, ax), use_pyplot=False, outlier_perc=0,
                                         alpha_overlay=alpha_overlay, cmap=cmap)  # fmt: skip
            else:
                ax.imshow(np.mean(img, axis=2), cmap="gray")
                ax.imshow(up, cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha_overlay)
                ax.set_xticks([])
                ax.set_yticks([])
            ax.set_title(f"block {b + 1}" if i == 0 else "", fontsize=7)
    fig.tight_layout()
    if colorbar and panels:
        label = (
            "identifiability score r = 1 - rank/|C|\n(1: target class ranked first; same scale in every panel)"
            if scale == "absolute"
            else "score / panel maximum"
        )
        add_colorbar(fig, list(fig.axes), cmap, 0.0, 1.0, label, shrink=0.8, pad=0.02)
    return fig
