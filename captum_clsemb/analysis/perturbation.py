r"""Perturbation experiments of the paper's Sec. 5: attention edits, token-group removal,
class- versus context-labelled tokens, and a composite-image test bed.

All dataset-level functions stream over batches: an image tensor with ``target``/``masks``
given alongside, or an iterable of ``(images, labels[, masks])`` batches (a DataLoader).
Identifiability scores are those of :class:`~captum_clsemb.attr.BlockwiseIdentifiability`
(Eq. 1 through the model's own final norm and head); a token is "identifiable" when its
score is 1 (target class top-1). When no labels are given, the target is the prediction of
the unperturbed model, so clean and perturbed runs are scored against the same class.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from captum.log import log_usage
from torch import Tensor, nn

from captum_clsemb._utils import TargetType
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.analysis._common import (
    DataType,
    RateAccumulator,
    iter_batches,
    target_or_prediction,
    token_groups,
)
from captum_clsemb.analysis.identifiability import accumulate_scores, summary_from
from captum_clsemb.attr.blockwise_identifiability import BlockwiseIdentifiability
from captum_clsemb.errors import InputValidationError
from captum_clsemb.trace.interventions import AttentionEdit

AVERAGES = ("tokens", "images")


# -- attention edits -----------------------------------------------------------------------
@log_usage(part_of_slo=True)
def attention_edit_effect(
    forward_func: nn.Module | ModelAdapter,
    inputs: DataType,
    target: TargetType = None,
    attention_edit: str | AttentionEdit = "self_only",
    edit_blocks: Iterable[int] | None = None,
    layer: str = "block",
    internal_batch_size: int | None = None,
) -> dict[str, dict[str, dict[str, Tensor]]]:
    r"""Identifiability per block without and with an attention edit (paper Sec. 5).

    ``"self_only"``: image tokens attend only to themselves (the paper: last-block rate
    60.73 % -> 0.12 % on ViT-B/32); ``"no_cls"``: image tokens do not attend to the class
    token (rows not renormalised, as the authors); or a callable ``(block, probs) -> probs``.
    Both runs exclude prefix tokens from the image-token rate (the authors' edited rate
    included the class token while their reference did not).

    Args:
        forward_func: a supported ViT or its adapter.
        inputs: an image tensor with ``target``, or an iterable of ``(images, labels)``.
        target: labels for tensor inputs; None: the unedited model's prediction.
        attention_edit: the edit. Default: ``"self_only"``.
        edit_blocks: blocks to edit (default: all, as the authors).
        layer: state scored, see :meth:`BlockwiseIdentifiability.attribute`.
        internal_batch_size: chunk size for tensor inputs.
    Returns:
        ``{"clean": s, "edited": s}``, each ``s = {"mean": {group: (blocks,)}, "rate":
        {group: (blocks,)}}`` with groups ``"image"`` and (class-token models) ``"cls"``;
        rates in percent, float64.
    """
    adapter = adapt(forward_func)
    if attention_edit is None:
        raise InputValidationError("attention_edit is required: 'self_only', 'no_cls' or a callable")
    bi = BlockwiseIdentifiability(adapter)
    groups = token_groups(adapter)
    acc = RateAccumulator(adapter.num_blocks)
    seen = 0
    for x, t, _ in iter_batches(adapter, inputs, target, None, internal_batch_size):
        t = target_or_prediction(adapter, x, t)
        accumulate_scores(acc, bi.attribute(x, target=t, layer=layer), groups, "clean/")
        edited = bi.attribute(
            x, target=t, layer=layer, attention_edit=attention_edit, edit_blocks=edit_blocks
        )
        accumulate_scores(acc, edited, groups, "edited/")
        seen += x.shape[0]
    if seen == 0:
        raise InputValidationError("inputs hold no images")
    return {"clean": summary_from(acc, groups, "clean/"), "edited": summary_from(acc, groups, "edited/")}


# -- masks to token labels ---------------------------------------------------------------------
def _grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    g = (grid, grid) if isinstance(grid, int) else tuple(int(v) for v in grid)
    if len(g) != 2 or min(g) < 1:
        raise InputValidationError(f"grid must be an int or (rows, cols) of positive ints, got {grid!r}")
    return g  # type: ignore[return-value]


def patch_coverage(mask: Tensor, grid: int | tuple[int, int]) -> Tensor:
    r"""Fraction of each patch cell covered by a mask.

    Args:
        mask: (N, H, W) or (H, W); bool, integer 0/1, or float coverage in [0, 1] (soft
            masks). It must be aligned with the model input, i.e. resized/cropped with the
            same geometric transform as the image.
        grid: patch grid (rows, cols), e.g. ``adapter.grid_size``, or an int for square.
    Returns:
        *Tensor* float (N, rows * cols) in raster order (the model's patch order). When H
        and W are multiples of the grid, cells are exact ``H/rows x W/cols`` blocks; else
        the cells of ``adaptive_avg_pool2d`` (bins ``[floor(i H/rows), ceil((i+1) H/rows))``).
    """
    mask = torch.as_tensor(mask)
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3:
        raise InputValidationError(f"mask must be (N, H, W) or (H, W), got shape {tuple(mask.shape)}")
    rows, cols = _grid(grid)
    if mask.shape[1] < rows or mask.shape[2] < cols:
        raise InputValidationError(
            f"mask of size {mask.shape[1]}x{mask.shape[2]} is smaller than the {rows}x{cols} patch grid; "
            "pass the mask at the model's input resolution"
        )
    m = mask.float() if not mask.is_floating_point() else mask
    if m.numel() and (m.min() < 0 or m.max() > 1):
        raise InputValidationError("mask values must lie in [0, 1] (bool, 0/1 or soft coverage)")
    return F.adaptive_avg_pool2d(m[:, None], (rows, cols))[:, 0].flatten(1)


def patch_labels_from_mask(mask: Tensor, grid: int | tuple[int, int], threshold: float = 0.5) -> Tensor:
    r"""Label image tokens as class tokens from a segmentation mask.

    A token is a "class" token when the fraction of its patch covered by the mask is at
    least ``threshold`` (default 0.5: the majority of its pixels), else a "context" token.
    The authors resized the mask with nearest-neighbour interpolation, which reads one
    pixel per patch (the top-left pixel of the cell with OpenCV); coverage is robust to
    thin structures and mask boundaries.

    Args:
        mask: (N, H, W) or (H, W) mask aligned with the model input, see :func:`patch_coverage`.
        grid: patch grid (rows, cols), e.g. ``adapter.grid_size``.
        threshold: minimum covered fraction, in (0, 1]. Default: 0.5.
    Returns:
        *Tensor* bool (N, rows * cols), True for class tokens, in the model's patch order.

    Examples::

        >>> labels = patch_labels_from_mask(masks, adapter.grid_size, threshold=0.5)
    """
    return coverage_to_labels(patch_coverage(mask, grid), threshold)


def coverage_to_labels(coverage: Tensor, threshold: float = 0.5) -> Tensor:
    r"""The class-token rule: covered share at least ``threshold`` (in (0, 1], default 0.5)."""
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold <= 1:
        raise InputValidationError(f"threshold must be a number in (0, 1], got {threshold!r}")
    # A tiny tolerance so that e.g. 8/16 covered pixels count as 0.5 despite float rounding.
    return coverage >= threshold - 1e-6


def _patch_labels(adapter: ModelAdapter, masks: Tensor | None, threshold: float) -> Tensor:
    """(N, num_patches) bool from pixel masks (N, H, W) or ready token labels (N, num_patches)."""
    if masks is None:
        raise InputValidationError(
            "masks are required: pass masks=... with tensor inputs, or yield (images, labels, masks) batches"
        )
    masks = torch.as_tensor(masks)
    if masks.dim() == 2:
        if masks.shape[1] != adapter.num_patches:
            raise InputValidationError(
                f"token labels must be (N, num_patches) = (N, {adapter.num_patches}), got {tuple(masks.shape)}; "
                "or pass pixel masks (N, H, W)"
            )
        if masks.dtype != torch.bool:
            if masks.is_floating_point() or ((masks != 0) & (masks != 1)).any():
                raise InputValidationError("token labels (N, num_patches) must be bool or 0/1 integers")
            masks = masks.bool()
        return masks
    if masks.dim() == 3:
        return patch_labels_from_mask(masks, adapter.grid_size, threshold)
    raise InputValidationError(
        f"masks must be pixel masks (N, H, W) or token labels (N, num_patches), got shape {tuple(masks.shape)}"
    )


def _add_group(acc: RateAccumulator, name: str, scores: Tensor, select: Tensor, average: str) -> None:
    """Add mean score and rate of the selected image tokens. scores (N, B, P), select (N, P) bool."""
    if average == "tokens":
        acc.add_mask(f"mean/{name}", scores, select)
        acc.add_mask(f"rate/{name}", scores == 1, select)
        return
    counts = select.sum(1)
    has = counts > 0
    if not has.any():
        return
    sel = select[has].to(scores.dtype)[:, None, :]
    c = counts[has].to(scores.dtype)[:, None]
    for stat, val in (("mean", scores[has]), ("rate", (scores[has] == 1).to(scores.dtype))):
        shares = (val * sel).sum(-1) / c  # (n, B) per-image share
        acc.add(f"{stat}/{name}", shares.sum(0), float(has.sum()))


def _check_average(average: str) -> None:
    if average not in AVERAGES:
        raise InputValidationError(f"average must be one of {AVERAGES}, got {average!r}")


def _group_result(acc: RateAccumulator, name: str) -> dict[str, Tensor]:
    return {"mean": acc.mean(f"mean/{name}"), "rate": acc.percent(f"rate/{name}")}


# -- class vs context tokens -------------------------------------------------------------------
@log_usage(part_of_slo=True)
def class_context_identifiability(
    forward_func: nn.Module | ModelAdapter,
    inputs: DataType,
    target: TargetType = None,
    masks: Tensor | None = None,
    threshold: float = 0.5,
    average: str = "tokens",
    internal_batch_size: int | None = None,
) -> dict[str, dict[str, Tensor]]:
    r"""Identifiability of class-labelled versus context-labelled image tokens per block (Fig. 3a).

    Args:
        forward_func: a supported ViT or its adapter.
        inputs: an image tensor with ``target`` and ``masks``, or an iterable of
            ``(images, labels, masks)`` batches.
        target: labels for tensor inputs; None: the model's prediction.
        masks: per image, a pixel mask (N, H, W) of the labelled object aligned with the
            model input (turned into token labels by :func:`patch_labels_from_mask` with
            ``threshold``), or ready token labels (N, num_patches) bool.
        threshold: coverage threshold for pixel masks. Default: 0.5.
        average: ``"tokens"`` (default) pools all tokens of a group over the dataset (each
            token counts once); ``"images"`` averages per-image values over the images
            that have tokens of the group.
        internal_batch_size: chunk size for tensor inputs.
    Returns:
        ``{"class": {"mean": (blocks,), "rate": (blocks,)}, "context": {...},
        "num_tokens": {"class": 0-d, "context": 0-d}}``; mean scores in [0, 1], rates in
        percent (float64), NaN when a group is empty.
    """
    adapter = adapt(forward_func)
    _check_average(average)
    bi = BlockwiseIdentifiability(adapter)
    p = adapter.num_prefix_tokens
    acc = RateAccumulator(adapter.num_blocks)
    counts = {"class": 0, "context": 0}
    seen = 0
    for x, t, m in iter_batches(adapter, inputs, target, masks, internal_batch_size):
        labels = _patch_labels(adapter, m, threshold).to(x.device)
        if labels.shape[0] != x.shape[0]:
            raise InputValidationError(f"a batch holds {x.shape[0]} images but {labels.shape[0]} masks")
        scores = bi.attribute(x, target=t)[:, :, p:]
        for name, sel in (("class", labels), ("context", ~labels)):
            _add_group(acc, name, scores, sel, average)
            counts[name] += int(sel.sum())
        seen += x.shape[0]
    if seen == 0:
        raise InputValidationError("inputs hold no images")
    out: dict[str, dict[str, Tensor]] = {name: _group_result(acc, name) for name in ("class", "context")}
    out["num_tokens"] = {name: torch.tensor(c) for name, c in counts.items()}
    return out


# -- token-group removal --------------------------------------------------------------------------
def _keep_only_edit(keep_seq: Tensor) -> AttentionEdit:
    """Attention edit: every query attends only to kept positions (rows renormalised)."""
    dropped = ~keep_seq[:, None, None, :]  # (N, 1, 1, T) key positions to ignore

    def edit(block: int, probs: Tensor) -> Tensor:
        out = probs.masked_fill(dropped, 0.0)
        return out / out.sum(-1, keepdim=True)

    return edit


@log_usage(part_of_slo=True)
def token_group_removal_effect(
    forward_func: nn.Module | ModelAdapter,
    inputs: DataType,
    target: TargetType = None,
    masks: Tensor | None = None,
    remove: str = "context",
    threshold: float = 0.5,
    method: str = "drop",
    average: str = "tokens",
    internal_batch_size: int | None = None,
) -> dict[str, object]:
    r"""Identifiability of the remaining tokens after removing class- or context-labelled tokens.

    The removed image tokens are taken out of the sequence after the position embedding
    (the authors' ``tokens_mask``); prefix tokens are always kept. The remaining tokens are
    scored per block and compared with the same tokens in the unperturbed model (paper
    Sec. 5: on ViT-B/32, class tokens 71.91 % -> 44.70 % without context; context tokens
    56.24 % -> 38.68 % without class tokens).

    Images keep different numbers of tokens, so a batch cannot be one sequence length:

    - ``method="drop"`` (default, exact) runs one sub-batch per distinct kept count
      (``trace(..., keep_tokens=...)``); at most ``num_patches + 1`` sub-batches per batch.
    - ``method="mask"`` keeps the full sequence and instead zeroes, in every block, the
      attention to removed tokens and renormalises the rows. The kept tokens and the class
      token then compute exactly what they compute with the removed tokens dropped
      (attention is the only place tokens mix), in one pass per batch; equal to "drop" up
      to float rounding (it would fail only if every kept probability underflowed).

    Images with no remaining token are skipped (counted in ``num_skipped``).

    Args:
        forward_func: a supported ViT or its adapter.
        inputs: an image tensor with ``target`` and ``masks``, or an iterable of
            ``(images, labels, masks)`` batches.
        target: labels for tensor inputs; None: the unperturbed model's prediction.
        masks: pixel masks (N, H, W) or token labels (N, num_patches), see
            :func:`class_context_identifiability`.
        remove: ``"context"`` (keep class tokens) or ``"class"`` (keep context tokens).
        threshold: coverage threshold for pixel masks. Default: 0.5.
        method: ``"drop"`` or ``"mask"``, see above.
        average: ``"tokens"`` or ``"images"``, see :func:`class_context_identifiability`.
        internal_batch_size: chunk size for tensor inputs.
    Returns:
        ``{"clean": {"mean", "rate"}, "removed": {"mean", "rate"}, "kept": "class"|"context",
        "num_images": 0-d, "num_skipped": 0-d}``; (blocks,) float64, rates in percent.
    """
    adapter = adapt(forward_func)
    _check_average(average)
    if remove not in ("context", "class"):
        raise InputValidationError(f"remove must be 'context' or 'class', got {remove!r}")
    if method not in ("drop", "mask"):
        raise InputValidationError(f"method must be 'drop' or 'mask', got {method!r}")
    bi = BlockwiseIdentifiability(adapter)
    p = adapter.num_prefix_tokens
    acc = RateAccumulator(adapter.num_blocks)
    num_images = num_skipped = 0
    for x, t, m in iter_batches(adapter, inputs, target, masks, internal_batch_size):
        labels = _patch_labels(adapter, m, threshold).to(x.device)
        if labels.shape[0] != x.shape[0]:
            raise InputValidationError(f"a batch holds {x.shape[0]} images but {labels.shape[0]} masks")
        keep = labels if remove == "context" else ~labels
        counts = keep.sum(1)
        has = counts > 0
        num_images += x.shape[0]
        num_skipped += int((~has).sum())
        if not has.any():
            continue
        x, keep, counts = x[has], keep[has], counts[has]
        t = target_or_prediction(adapter, x, None if t is None else t[has])
        _add_group(acc, "clean", bi.attribute(x, target=t)[:, :, p:], keep, average)
        if method == "mask":
            keep_seq = torch.cat([torch.ones_like(keep[:, :p]), keep], 1)
            scores = bi.attribute(x, target=t, attention_edit=_keep_only_edit(keep_seq))[:, :, p:]
            _add_group(acc, "removed", scores, keep, average)
            continue
        for c in counts.unique().tolist():
            idx = (counts == c).nonzero()[:, 0]
            scores = bi.attribute(x[idx], target=t[idx], keep_tokens=keep[idx])[:, :, p:]
            _add_group(acc, "removed", scores, torch.ones_like(scores[:, 0], dtype=torch.bool), average)
    if num_images == 0:
        raise InputValidationError("inputs hold no images")
    return {
        "clean": _group_result(acc, "clean"),
        "removed": _group_result(acc, "removed"),
        "kept": "class" if remove == "context" else "context",
        "num_images": torch.tensor(num_images),
        "num_skipped": torch.tensor(num_skipped),
    }


# -- composite test bed ---------------------------------------------------------------------------
def _box_size(size: float | int | tuple[int, int], height: int, width: int) -> tuple[int, int]:
    if isinstance(size, float):
        if not 0 < size <= 1:
            raise InputValidationError(f"a float size is a fraction of the image side in (0, 1], got {size}")
        return max(1, round(size * height)), max(1, round(size * width))
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, int) and 1 <= v for v in hw) or hw[0] > height or hw[1] > width:
        raise InputValidationError(
            f"size must be a fraction in (0, 1], or pixels (h, w) within the {height}x{width} image, got {size!r}"
        )
    return hw  # type: ignore[return-value]


def make_composite_images(
    objects: Tensor,
    backgrounds: Tensor,
    size: float | int | tuple[int, int] = 0.5,
    position: str | tuple[int, int] | Tensor = "center",
    align: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Paste object images into part of background images: a test bed with exact masks.

    Each object image is resized (bilinear, antialiased) to a ``size`` box and pasted over
    its background; the returned mask is exactly the pasted box. With ``align`` set to the
    patch size and a box that is a multiple of it, every patch is entirely object or
    entirely background, so token labels do not depend on the threshold.

    Args:
        objects: (N, C, h, w) object images (any size), in the model's input normalisation.
        backgrounds: (N, C, H, W) or (C, H, W) (shared) background images, same normalisation.
        size: box size: a fraction of the background side (float in (0, 1]), pixels (int),
            or (h, w) pixels. Default: 0.5.
        position: ``"center"``, ``"random"`` (uniform top-left, using ``generator``), a
            (top, left) pair for all images, or a (N, 2) tensor of per-image (top, left).
        align: snap top/left down to a multiple of this (e.g. the patch size).
        generator: random generator for ``position="random"``.
    Returns:
        ``(images, masks)``: (N, C, H, W) composites and (N, H, W) bool masks of the object.

    Examples::

        >>> images, masks = make_composite_images(cats, grass, size=16, position="random", align=4)
        >>> labels = patch_labels_from_mask(masks, adapter.grid_size)
    """
    if not isinstance(objects, Tensor) or objects.dim() != 4:
        raise InputValidationError("objects must be a tensor (N, C, h, w)")
    if not isinstance(backgrounds, Tensor) or backgrounds.dim() not in (3, 4):
        raise InputValidationError("backgrounds must be a tensor (N, C, H, W) or (C, H, W)")
    n, ch = objects.shape[:2]
    bg = backgrounds.expand(n, -1, -1, -1) if backgrounds.dim() == 3 else backgrounds
    if bg.shape[0] == 1:
        bg = bg.expand(n, -1, -1, -1)
    if bg.shape[0] != n or bg.shape[1] != ch:
        raise InputValidationError(
            f"backgrounds {tuple(backgrounds.shape)} do not match objects {tuple(objects.shape)} (N and channels)"
        )
    height, width = bg.shape[2:]
    bh, bw = _box_size(size, height, width)
    obj = objects.to(bg.dtype)
    if (obj.shape[2], obj.shape[3]) != (bh, bw):
        obj = F.interpolate(obj, size=(bh, bw), mode="bilinear", align_corners=False, antialias=True)
    dev = bg.device
    if isinstance(position, str):
        if position == "center":
            top = torch.full((n,), (height - bh) // 2, device=dev)
            left = torch.full((n,), (width - bw) // 2, device=dev)
        elif position == "random":
            top = torch.randint(0, height - bh + 1, (n,), generator=generator).to(dev)
            left = torch.randint(0, width - bw + 1, (n,), generator=generator).to(dev)
        else:
            raise InputValidationError(
                f"position must be 'center', 'random', (top, left) or (N, 2), got {position!r}"
            )
    else:
        pos = torch.as_tensor(position, device=dev).long()
        pos = pos.expand(n, 2) if pos.shape == (2,) else pos
        if pos.shape != (n, 2):
            raise InputValidationError(
                f"position must be (top, left) or (N, 2), got shape {tuple(pos.shape)}"
            )
        top, left = pos[:, 0], pos[:, 1]
    if align is not None:
        if not isinstance(align, int) or align < 1:
            raise InputValidationError(f"align must be a positive int, got {align!r}")
        top, left = top - top % align, left - left % align
    if (top < 0).any() or (left < 0).any() or (top + bh > height).any() or (left + bw > width).any():
        raise InputValidationError(
            f"the {bh}x{bw} object box does not fit the {height}x{width} image at every position"
        )
    rows = torch.arange(height, device=dev)[None] - top[:, None]  # (N, H) row inside the box
    cols = torch.arange(width, device=dev)[None] - left[:, None]
    in_r, in_c = (rows >= 0) & (rows < bh), (cols >= 0) & (cols < bw)
    masks = in_r[:, :, None] & in_c[:, None, :]
    batch = torch.arange(n, device=dev)[:, None, None]
    placed = obj[
        batch, :, rows.clamp(0, bh - 1)[:, :, None], cols.clamp(0, bw - 1)[:, None, :]
    ]  # (N, H, W, C)
    images = torch.where(masks[:, None], placed.permute(0, 3, 1, 2), bg)
    return images, masks
