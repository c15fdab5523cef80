"""Figures for explanation maps: a block x head grid (paper Fig. 5a) and a global map over an image.

Every panel is drawn by Captum's ``visualize_image_attr`` (``use_pyplot=False``), after
upsampling the patch-grid map to the image size with ``LayerAttribution.interpolate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from captum.attr import LayerAttribution
from captum.attr import visualization as captum_viz
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from captum_clsemb.errors import InputValidationError
from captum_clsemb.viz._common import add_colorbar, captum_cmap, captum_scale_label

_SIGN_FILTERS = {
    "all": lambda a: a,
    "positive": lambda a: np.clip(a, 0, None),
    "negative": lambda a: np.clip(a, None, 0),
    "absolute_value": np.abs,
}


def _image_hwc(
    image: Tensor | np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None
) -> np.ndarray:
    """(3, H, W) tensor or (H, W, 3) array -> (H, W, 3) float array in [0, 1]."""
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise InputValidationError(
                f"image tensor must be (3, H, W) (one image, channels first), got {tuple(image.shape)}"
            )
        arr = image.detach().cpu().double().permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image, dtype=np.float64)
        if arr.ndim != 3 or arr.shape[2] not in (1, 3):
            raise InputValidationError(
                f"image array must be (H, W, 3) (one image, channels last), got {arr.shape}"
            )
    if (mean is None) != (std is None):
        raise InputValidationError("give both mean and std to undo the normalisation, or neither")
    if mean is not None:
        arr = arr * np.asarray(std, dtype=np.float64) + np.asarray(mean, dtype=np.float64)
        arr = arr.clip(0, 1)
    if arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
        raise InputValidationError(
            f"image values must be in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]; pass the un-normalised "
            "image, or the preprocessing's mean= and std= to undo it"
        )
    return arr.clip(0, 1)


def _as_tensor(maps: Tensor | np.ndarray) -> Tensor:
    return (
        maps.detach().cpu().double()
        if isinstance(maps, Tensor)
        else torch.as_tensor(np.asarray(maps), dtype=torch.float64)
    )


def _upsample(maps: Tensor, size: tuple[int, int]) -> np.ndarray:
    """(R, C, h, w) -> (R, C, H, W) numpy, bilinear, with Captum's LayerAttribution.interpolate."""
    return LayerAttribution.interpolate(maps, size, "bilinear").numpy()


def _draw_panel(
    fig: Figure,
    ax: Axes,
    attr: np.ndarray,
    image: np.ndarray,
    method: str,
    sign: str,
    cmap: str | None,
    alpha_overlay: float,
    outlier_perc: float,
    title: str | None,
) -> None:
    if sign not in _SIGN_FILTERS:
        raise InputValidationError(f"sign must be one of {sorted(_SIGN_FILTERS)}, got {sign!r}")
    if not np.any(_SIGN_FILTERS[sign](attr)):
        # Captum cannot scale a map with no value of the requested sign (division by 0):
        # show the image alone and say so.
        ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{title}\n(no {sign} values)" if title else f"(no {sign} values)", fontsize=8)
        return
    captum_viz.visualize_image_attr(
        attr[..., None],
        image,
        method=method,
        sign=sign,
        plt_fig_axis=(fig, ax),
        outlier_perc=outlier_perc,
        cmap=cmap,
        alpha_overlay=alpha_overlay,
        title=title,
        use_pyplot=False,
    )


def plot_block_head_grid(
    maps: Tensor | np.ndarray,
    image: Tensor | np.ndarray,
    blocks: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    method: str = "blended_heat_map",
    sign: str = "all",
    cmap: str | None = None,
    alpha_overlay: float = 0.5,
    outlier_perc: float = 2,
    panel_size: float = 1.6,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    title: str | None = None,
    colorbar: bool = True,
) -> Figure:
    r"""A grid of per-block, per-head maps over one image (rows: blocks, columns: heads).

    Args:
        maps: (num_blocks, num_heads, h, w) maps for one image, e.g.
            ``ClassEmbeddingGradient(model).attribute(x, target=t, return_per="head")[0]``.
            A (num_blocks, h, w) array (``return_per="block"``) is drawn as one column.
        image: the image, a (3, H, W) tensor or an (H, W, 3) array with values in [0, 1]
            (or normalised, with ``mean`` and ``std`` given).
        blocks: row labels (block numbers). Default: 0, 1, ...
        heads: column labels (head numbers). Default: 0, 1, ...
        method: Captum visualization method (``"blended_heat_map"``, ``"heat_map"``,
            ``"masked_image"``, ``"alpha_scaling"``). Default: ``"blended_heat_map"``.
        sign: Captum sign (``"all"``, ``"positive"``, ``"negative"``,
            ``"absolute_value"``). Default: ``"all"`` (the gradients are signed).
            Each panel is scaled on its own by Captum (``outlier_perc``); panels with no
            value of the requested sign show the image alone.
        cmap, alpha_overlay, outlier_perc: passed to ``visualize_image_attr``.
        panel_size: inches per panel.
        mean, std: the preprocessing's normalisation, to undo it on ``image``.
        title: figure title.
        colorbar: add one colour bar for all panels (Captum's colour map for ``sign``), labelled
            with the per-panel normalisation. Default: True.
    Returns:
        a matplotlib ``Figure`` (not shown; no pyplot state) with num_blocks x num_heads axes
        (and, with ``colorbar``, the colour bar's axes last).

    Examples::

        >>> maps = ClassEmbeddingGradient(model).attribute(x[:1], target=3, return_per="head")[0]
        >>> fig = plot_block_head_grid(maps, x[0], mean=(0.5,) * 3, std=(0.5,) * 3)
        >>> fig.savefig("heads.png")
    """
    m = _as_tensor(maps)
    if m.dim() == 3:
        m = m.unsqueeze(1)
    if m.dim() != 4:
        raise InputValidationError(
            f"maps must be (num_blocks, num_heads, h, w) for one image, got shape {tuple(m.shape)}; "
            "index the batch first, e.g. attribute(...)[0]"
        )
    img = _image_hwc(image, mean, std)
    nb, nh = m.shape[:2]
    row_labels = list(blocks) if blocks is not None else list(range(nb))
    col_labels = list(heads) if heads is not None else list(range(nh))
    if len(row_labels) != nb or len(col_labels) != nh:
        raise InputValidationError(
            f"got {len(row_labels)} block labels and {len(col_labels)} head labels for maps of "
            f"{nb} blocks x {nh} heads"
        )
    up = _upsample(m, img.shape[:2])
    fig = Figure(figsize=(panel_size * nh, panel_size * nb + (0.4 if title else 0)))
    axes = fig.subplots(nb, nh, squeeze=False)
    for r in range(nb):
        for c in range(nh):
            ax = axes[r][c]
            panel_title = f"head {col_labels[c]}" if r == 0 and nh > 1 else None
            _draw_panel(fig, ax, up[r, c], img, method, sign, cmap, alpha_overlay, outlier_perc, panel_title)
            if c == 0:
                ax.set_ylabel(f"block {row_labels[r]}", fontsize=8)
    if title:
        fig.suptitle(title)
    if colorbar:
        _colorbar(fig, axes, method, sign, cmap, outlier_perc)
    return fig


def _colorbar(
    fig: Figure, axes: object, method: str, sign: str, cmap: str | None, outlier_perc: float
) -> None:
    """The shared colour bar of Captum-drawn panels: each panel is normalised on its own."""
    if method not in ("blended_heat_map", "heat_map"):  # masks and alpha scaling have no colour map
        return
    cm, vmin, vmax = captum_cmap(sign, cmap)
    add_colorbar(fig, axes, cm, vmin, vmax, captum_scale_label(sign, outlier_perc), shrink=0.6, pad=0.02)


def plot_global_map(
    attr_map: Tensor | np.ndarray,
    image: Tensor | np.ndarray,
    method: str = "blended_heat_map",
    sign: str = "all",
    cmap: str | None = None,
    alpha_overlay: float = 0.5,
    outlier_perc: float = 2,
    show_image: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    title: str | None = None,
    fig_size: tuple[float, float] = (3.2, 3.2),
    colorbar: bool = True,
) -> Figure:
    r"""One global map over one image, optionally beside the image itself.

    Args:
        attr_map: (h, w), (1, h, w) or (1, 1, h, w) map for one image, e.g.
            ``ClassEmbeddingGradient(model).attribute(x, target=t)[0]``.
        image: a (3, H, W) tensor or an (H, W, 3) array in [0, 1] (or normalised with
            ``mean``/``std`` given).
        method, sign, cmap, alpha_overlay, outlier_perc: as in :func:`plot_block_head_grid`.
        show_image: add a first panel with the image alone (drawn by ``visualize_image_attr``
            with ``method="original_image"``). Default: True.
        mean, std: the preprocessing's normalisation, to undo it on ``image``.
        title: title of the map panel.
        fig_size: inches per panel.
        colorbar: add a colour bar to the map panel, labelled with its normalisation.
            Default: True.
    Returns:
        a matplotlib ``Figure`` with 2 axes (image, map), or 1 with ``show_image=False``
        (and, with ``colorbar``, the colour bar's axes last).
    """
    m = _as_tensor(attr_map)
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise InputValidationError(
            f"attr_map must be one map (h, w), (1, h, w) or (1, 1, h, w), got shape {tuple(_as_tensor(attr_map).shape)}"
        )
    img = _image_hwc(image, mean, std)
    up = _upsample(m[None, None], img.shape[:2])[0, 0]
    ncols = 2 if show_image else 1
    fig = Figure(figsize=(fig_size[0] * ncols, fig_size[1]))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    if show_image:
        # method="original_image" ignores the attribution (ones avoid Captum's zero-scale assert)
        captum_viz.visualize_image_attr(
            np.ones((*img.shape[:2], 1)), img, method="original_image", sign="all", plt_fig_axis=(fig, axes[0]),
            title="image", use_pyplot=False,
        )  # fmt: skip
    _draw_panel(fig, axes[-1], up, img, method, sign, cmap, alpha_overlay, outlier_perc, title)
    if colorbar:
        _colorbar(fig, axes[-1], method, sign, cmap, outlier_perc)
    return fig


def plot_method_grid(
    maps: dict[str, Tensor],
    images: Tensor,
    titles: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    method: str = "blended_heat_map",
    sign: str = "all",
    alpha_overlay: float = 0.5,
    outlier_perc: float = 2,
    panel_size: float = 1.6,
    colorbar: bool = True,
) -> Figure:
    r"""Global maps of several explanation methods side by side (rows: images, columns: methods).

    Args:
        maps: ``{method name: (N, 1, h, w) maps}`` for the same N images.
        images: (N, 3, H, W) images (normalised with ``mean``/``std`` if given).
        titles: one label per image (row).
        method, sign, alpha_overlay, outlier_perc: passed to
            :func:`captum.attr.visualization.visualize_image_attr` for every panel.
        colorbar: add one colour bar for all map panels, labelled with the per-panel
            normalisation (each method's map is scaled on its own). Default: True.
    Returns:
        a matplotlib ``Figure`` with N rows and 1 + len(maps) columns (image first), and
        with ``colorbar`` the colour bar's axes last.
    """
    n, names = images.shape[0], list(maps)
    fig = Figure(figsize=(panel_size * (len(names) + 1), panel_size * n + 0.4))
    axes = fig.subplots(n, len(names) + 1, squeeze=False)
    for i in range(n):
        img = _image_hwc(images[i], mean, std)
        captum_viz.visualize_image_attr(
            np.ones((*img.shape[:2], 1)), img, method="original_image", sign="all", plt_fig_axis=(fig, axes[i, 0]),
            title=(titles[i] if titles else None), use_pyplot=False,
        )  # fmt: skip
        for j, name in enumerate(names):
            m = _as_tensor(maps[name])[i].reshape(1, 1, *_as_tensor(maps[name]).shape[-2:])
            up = _upsample(m, img.shape[:2])[0, 0]
            _draw_panel(fig, axes[i, j + 1], up, img, method, sign, None, alpha_overlay, outlier_perc,
                        name if i == 0 else None)  # fmt: skip
    for ax in axes.flat:
        ax.title.set_fontsize(7)
    fig.tight_layout()
    if colorbar:
        _colorbar(fig, list(axes.flat), method, sign, None, outlier_perc)
    return fig
