r"""Pixel-removal perturbation test of Chefer et al. (CVPR 2021) for any image classifier."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from captum.attr import LayerAttribution
from captum.log import log_usage
from torch import Tensor

from captum_clsemb._utils import TargetType, check_finite, format_inputs
from captum_clsemb.adapters import ModelAdapter
from captum_clsemb.errors import InputValidationError
from captum_clsemb.metrics._common import (
    check_batch_size,
    check_options,
    forward_logits,
    input_checker,
    real_attributions,
    removal_order,
    score_logits,
    targets_and_labels,
)
from captum_clsemb.metrics.auc import DEFAULT_FRACTIONS, check_fractions, pixels_to_remove, summarize_curves


def pixel_scores(attributions: Tensor, inputs: Tensor) -> Tensor:
    r"""Attributions -> one score per pixel, (N, H*W) in raster order.

    (N, 1, H, W) is used as is; (N, C, H, W) matching the inputs is summed over channels;
    any other (N, 1, h, w) (e.g. a patch-grid map) is upsampled to (H, W) with
    ``LayerAttribution.interpolate(..., "bilinear")`` (``align_corners=False``, as Chefer's
    ``F.interpolate(scale_factor=16, mode="bilinear")``).
    """
    n, c, h, w = inputs.shape
    a = real_attributions(attributions)
    if a.dim() != 4 or a.shape[0] != n or a.shape[1] not in (1, c):
        shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
        raise InputValidationError(
            f"attributions must be (N, 1, h, w) (a map at pixel or patch resolution) or (N, C, H, W) like the "
            f"inputs, with N = {n}; got {shape}"
        )
    if a.shape[1] != 1:
        if tuple(a.shape[2:]) != (h, w):
            raise InputValidationError(
                f"multi-channel attributions must match the inputs' shape {tuple(inputs.shape)}, got {tuple(a.shape)}"
            )
        a = a.sum(1, keepdim=True)
    if tuple(a.shape[2:]) != (h, w):
        a = LayerAttribution.interpolate(a, (h, w), "bilinear")
    return a.flatten(1)


@log_usage(part_of_slo=True)
def pixel_removal_auc(
    forward_func: Callable[[Tensor], Tensor] | ModelAdapter,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    mode: str = "negative",
    fractions: Sequence[float] | Tensor = DEFAULT_FRACTIONS,
    score: str = "accuracy",
    baseline: float | Tensor = 0.0,
    auc: str = "trapezoid",
    return_curve: bool = False,
    max_examples_per_batch: int | None = None,
    labels: TargetType = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Perturbation AUC by replacing pixels with a baseline, ordered by an attribution map.

    Chefer et al.'s protocol (``pertubation_eval_from_hdf5.py``) for any classifier: at each
    removal fraction ``f`` the top ``floor(f * H * W)`` pixels of the map (positive) or of
    the negated map (negative) are set to ``baseline`` across all channels, and the model
    is scored on the result.

    * ``mode="negative"``: least important first; **higher AUC is better**.
    * ``mode="positive"``: most important first; **lower AUC is better**.

    Order and ties: a stable sort by descending attribution (positive) or descending negated
    attribution (negative); ties go to the **lower flat pixel index** (raster order,
    ``row * W + col``) first in both modes. An all-zero map thus removes the image from the
    top-left corner row by row, and a constant map gives identical curves in both modes.

    Patch-grid maps (N, 1, h, w) are upsampled to (H, W) with
    ``captum.attr.LayerAttribution.interpolate(map, (H, W), "bilinear")`` (PyTorch's
    ``align_corners=False``), as Chefer et al. do; min-max normalisation does not change
    the order and is not applied. Multi-channel maps (N, C, H, W) are summed over channels.

    AUC conventions as :func:`token_removal_auc`: ``"trapezoid"`` (default,
    ``torch.trapezoid(curve, x=fractions) * 100``; 90 for a flat curve at 1 with the
    default fractions) or ``"authors"`` (normalised sum of the mean curve,
    ``sum(m) / (max(m) * (S + 1))`` for S fractions: the authors' ``sum(m) / (max(m) * P)``
    with their P - 1 token steps; they never removed pixels).

    Batching: all (example, step) pairs with pixels removed are stacked and evaluated in
    forwards of at most ``max_examples_per_batch`` perturbed images (Captum's meaning);
    the unperturbed input (f = 0, and the prediction when ``target`` is None) costs one
    more forward per chunk.

    Args:
        forward_func: any callable mapping images (N, C, H, W) to logits (N, classes), e.g. a
            timm model or ``lambda x: hf_model(pixel_values=x).logits`` (outputs with a
            ``.logits`` attribute are unwrapped). Put the model in eval mode yourself.
        inputs: images (N, C, H, W) as the model expects them.
        attributions: (N, 1, H, W), (N, C, H, W) or a patch-grid map (N, 1, h, w).
        target: class per example scored by ``"probability"``/``"logit"``; None uses the
            prediction on the unperturbed input.
        mode: ``"negative"`` or ``"positive"``. Default: ``"negative"``.
        fractions: removal fractions, strictly increasing in [0, 1]. Default: 0, 0.1, ..., 0.9.
        score: ``"accuracy"`` (top-1 vs ``labels``, else ``target``, else the clean
            prediction), ``"probability"`` or ``"logit"`` of the target class.
        baseline: value of removed pixels: a scalar or a tensor broadcastable to the inputs,
            e.g. ``(-mean / std).view(1, 3, 1, 1)`` for black pixels of normalised images
            (Chefer zeroes pixels in [0, 1] space). Default: 0.
        auc: ``"trapezoid"`` or ``"authors"``. Default: ``"trapezoid"``.
        return_curve: also return the per-example curves (N, S). Default: False.
        max_examples_per_batch: perturbed images per forward. Default: all pairs at once.
        labels: ground-truth classes for ``score="accuracy"``.
    Returns:
        *Tensor* (N,) of per-example AUCs, or ``(auc, curves)`` when ``return_curve``.

    Examples::

        >>> from captum_clsemb.metrics import pixel_removal_auc
        >>> attr = AttentionRollout(model).attribute(x)        # (N, 1, 14, 14)
        >>> pixel_removal_auc(model, x, attr, labels=y, mode="positive").mean()
    """
    check_options(mode, score, auc)
    inputs, _ = format_inputs(inputs)
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        raise InputValidationError("inputs must be a tensor of images (N, C, H, W)")
    adapter = input_checker(forward_func)
    if adapter is not None:  # a supported ViT: its full input checks (size, dtype, device, ...)
        inputs = adapter.check_inputs(inputs)
    if inputs.shape[0] == 0:
        raise InputValidationError("inputs hold no images (a batch of size 0); pass at least one image")
    check_finite(inputs)
    x = inputs
    n, num_pixels = x.shape[0], x.shape[2] * x.shape[3]
    fr = check_fractions(fractions)
    counts = pixels_to_remove(fr, num_pixels)
    order = removal_order(pixel_scores(attributions, x).to(x.device), mode)
    # rank[i, p] = position of pixel p in example i's removal order
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num_pixels, device=x.device).expand(n, -1))
    try:
        base = torch.broadcast_to(torch.as_tensor(baseline, dtype=x.dtype, device=x.device), x.shape)
    except RuntimeError as e:
        raise InputValidationError(
            f"baseline must be a scalar or broadcastable to the inputs {tuple(x.shape)}: {e}"
        ) from e
    if not bool(torch.isfinite(base).all()):
        raise InputValidationError("baseline contains NaN or infinite values; use finite pixel values")
    chunk = check_batch_size(max_examples_per_batch, n * len(counts))
    curves = torch.empty(n, len(counts), dtype=x.dtype, device=x.device)
    with torch.no_grad():
        clean_scores = None
        need_clean = target is None or 0 in counts
        if need_clean:
            clean = torch.cat([forward_logits(forward_func, x[s : s + chunk]) for s in range(0, n, chunk)])
        num_classes = clean.shape[1] if need_clean else forward_logits(forward_func, x[:1]).shape[1]
        tgt, lab = targets_and_labels(target, labels, n, num_classes, x.device)
        if tgt is None:
            tgt = clean.argmax(-1)
        lab = tgt if lab is None else lab
        if 0 in counts:
            clean_scores = score_logits(clean, tgt, lab, score)
        steps = [s for s, k in enumerate(counts) if k > 0]
        for s, k in enumerate(counts):
            if k == 0:
                curves[:, s] = clean_scores
        # (example, step) pairs, example-major, evaluated `chunk` at a time
        ex = torch.arange(n, device=x.device).repeat_interleave(len(steps))
        st = torch.tensor(steps, dtype=torch.long, device=x.device).repeat(n)
        k_all = torch.tensor(counts, dtype=torch.long, device=x.device)[st]
        for start in range(0, ex.numel(), chunk):
            e, s, k = ex[start : start + chunk], st[start : start + chunk], k_all[start : start + chunk]
            removed = (rank[e] < k[:, None]).view(-1, 1, *x.shape[2:])
            perturbed = torch.where(removed, base[e], x[e])
            curves[e, s] = score_logits(forward_logits(forward_func, perturbed), tgt[e], lab[e], score).to(
                curves.dtype
            )
    result = summarize_curves(curves, fr, auc)
    return (result, curves) if return_curve else result
