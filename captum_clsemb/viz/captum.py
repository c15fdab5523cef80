r"""Any of the package's maps, over its image, in Captum's own ``visualize_image_attr``.

Captum's :func:`captum.attr.visualization.visualize_image_attr` takes one example as NumPy
arrays: the attribution (H, W) or (H, W, C) and the image (H, W, C). Given a patch-grid
map (h, w) and a full-size image it draws the map over the top-left h x w pixels without a
warning. :func:`to_captum_arrays` turns a map of this package (patch grid, upsampled, or
shaped like the inputs) and the image the model saw into exactly those arrays, upsampling
patch grids bilinearly to the image size; :func:`visualize_image_attr` and
:func:`visualize_image_attr_multiple` are Captum's functions taking tensors, and raise an
error where the sizes do not match instead of drawing the corner picture.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import visualization as captum_viz
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from captum_clsemb.errors import InputValidationError
from captum_clsemb.viz.explanations import _image_hwc

__all__ = ["to_captum_arrays", "visualize_image_attr", "visualize_image_attr_multiple"]


def _map_chw(attributions: Tensor | np.ndarray) -> Tensor:
    """One example's map as a float64 (c, h, w) tensor (tensors channels first, arrays channels last)."""
    if isinstance(attributions, tuple) and len(attributions) == 1:  # Captum's 1-tuple output
        attributions = attributions[0]
    if isinstance(attributions, Tensor):
        a = attributions.detach().cpu().double()
        if a.dim() == 4:
            if a.shape[0] != 1:
                raise InputValidationError(
                    f"attributions hold {a.shape[0]} examples; pass one at a time, e.g. attributions[i]"
                )
            a = a[0]
        if a.dim() == 2:
            a = a[None]
        if a.dim() != 3:
            raise InputValidationError(
                f"expected one example's map, (h, w), (1, h, w) or (C, H, W), got shape {tuple(attributions.shape)}; "
                "select one map first, e.g. maps[i, block, head] of a per-head result"
            )
        return a
    arr = np.asarray(attributions, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise InputValidationError(
            f"expected one example's map as an array (H, W) or (H, W, C) (Captum's layout), got {arr.shape}"
        )
    return torch.from_numpy(arr).permute(2, 0, 1)


def to_captum_arrays(
    attributions: Tensor | np.ndarray,
    image: Tensor | np.ndarray | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    upsample: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    r"""One example's map and image as the arrays ``captum.attr.visualization`` expects.

    Args:
        attributions: the map of one example, as any attribution class of this package
            returns it for one image: a tensor (h, w), (1, h, w), (C, H, W) or with a leading
            batch dimension of 1, e.g. ``maps[i]`` or ``maps[i:i + 1]``; a patch grid, an
            upsampled map or a map shaped like the inputs (``interpolate_to="input"``).
            NumPy arrays are read in Captum's layout, (H, W) or (H, W, C).
        image: the image the map explains: the preprocessed tensor (C, H, W) given to the
            model (pass ``mean`` and ``std`` to undo its normalisation), or an (H, W, C)
            array in [0, 1]. None: return the map alone (at its own size).
        mean, std: per-channel normalisation of ``image`` to undo for display.
        upsample: upsample a smaller map (a patch grid) bilinearly to the image size
            (``align_corners=False``, as ``captum.attr.LayerAttribution.interpolate``).
            Default: True. With False, a map whose size differs from the image's is an
            error.
    Returns:
        ``(attr, image)``: ``attr`` a float (H, W, c) array (c = 1, or the map's channels,
        which Captum sums); ``image`` a float (H, W, C) array in [0, 1], or None.

    Examples::

        >>> from captum.attr import visualization as viz
        >>> from captum_clsemb.viz import to_captum_arrays
        >>> maps = ClassEmbeddingGradient(model).attribute(x, target=y)      # (N, 1, h, w)
        >>> attr, img = to_captum_arrays(maps[0], x[0], mean=MEAN, std=STD)  # (H, W, 1), (H, W, 3)
        >>> viz.visualize_image_attr(attr, img, method="blended_heat_map", sign="all")
    """
    a = _map_chw(attributions)
    if image is None:
        return a.permute(1, 2, 0).numpy(), None
    img = _image_hwc(image, mean, std)
    size, (h, w) = img.shape[:2], a.shape[1:]
    if (h, w) != size:
        if not upsample or h > size[0] or w > size[1]:
            raise InputValidationError(
                f"the map is {h}x{w} but the image is {size[0]}x{size[1]}: Captum would draw the map over the "
                f"top-left {min(h, size[0])}x{min(w, size[1])} pixels only. Pass the image the model saw, and "
                "upsample the map (upsample=True, or attribute(..., interpolate_to=x.shape[-2:]))"
            )
        a = F.interpolate(a[None], size=size, mode="bilinear", align_corners=False)[0]
    return a.permute(1, 2, 0).numpy(), img


def visualize_image_attr(
    attributions: Tensor | np.ndarray,
    image: Tensor | np.ndarray | None = None,
    method: str = "heat_map",
    sign: str = "absolute_value",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    upsample: bool = True,
    use_pyplot: bool = False,
    **kwargs,
) -> tuple[Figure, Axes]:
    r"""Captum's :func:`~captum.attr.visualization.visualize_image_attr` for one example's map.

    The map and image are converted by :func:`to_captum_arrays` (patch grids upsampled to
    the image); every other argument is Captum's (``plt_fig_axis``, ``outlier_perc``,
    ``cmap``, ``alpha_overlay``, ``show_colorbar``, ``title``, ``fig_size``).

    Args:
        attributions, image, mean, std, upsample: see :func:`to_captum_arrays`.
        method, sign: Captum's. Default: ``"heat_map"``, ``"absolute_value"``.
        use_pyplot: Captum's; here False by default (returns the figure without showing it).
    Returns:
        ``(figure, axis)`` from Captum.
    """
    attr, img = to_captum_arrays(attributions, image, mean, std, upsample)
    return captum_viz.visualize_image_attr(
        attr, img, method=method, sign=sign, use_pyplot=use_pyplot, **kwargs
    )


def visualize_image_attr_multiple(
    attributions: Tensor | np.ndarray,
    image: Tensor | np.ndarray | None,
    methods: list[str],
    signs: list[str],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    upsample: bool = True,
    use_pyplot: bool = False,
    **kwargs,
) -> tuple[Figure, Axes | list[Axes]]:
    r"""Captum's :func:`~captum.attr.visualization.visualize_image_attr_multiple` for one map.

    Args:
        attributions, image, mean, std, upsample: see :func:`to_captum_arrays`.
        methods, signs: Captum's, one per panel, e.g. ``["original_image", "blended_heat_map"]``
            and ``["all", "all"]``.
        use_pyplot: Captum's; here False by default.
    Returns:
        ``(figure, axes)`` from Captum.
    """
    attr, img = to_captum_arrays(attributions, image, mean, std, upsample)
    return captum_viz.visualize_image_attr_multiple(
        attr, img, methods=methods, signs=signs, use_pyplot=use_pyplot, **kwargs
    )
