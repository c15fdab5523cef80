r"""Token-removal perturbation test (Vilas et al., NeurIPS 2023, Sec. 7-8) as a Captum-style metric."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from captum.log import log_usage
from torch import Tensor, nn

from captum_clsemb._utils import TargetType
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.errors import InputValidationError
from captum_clsemb.metrics._common import (
    check_batch_size,
    check_options,
    real_attributions,
    removal_order,
    score_logits,
    targets_and_labels,
)
from captum_clsemb.metrics.auc import DEFAULT_FRACTIONS, check_fractions, summarize_curves, tokens_to_remove
from captum_clsemb.trace import trace


def patch_scores(attributions: Tensor, num_examples: int, grid: tuple[int, int]) -> Tensor:
    """Attributions (N, P) or (N, 1, h, w) on the patch grid -> (N, P) in raster order."""
    h, w = grid
    a = real_attributions(attributions)
    if a.dim() == 4 and a.shape[1] == 1 and tuple(a.shape[2:]) == (h, w):
        a = a.flatten(1)
    if a.dim() != 2 or a.shape != (num_examples, h * w):
        raise InputValidationError(
            f"attributions must be on the patch grid: (N, num_patches) = ({num_examples}, {h * w}) or "
            f"(N, 1, h, w) = ({num_examples}, 1, {h}, {w}), got {tuple(a.shape)}; for pixel-level maps use "
            "pixel_removal_auc, or pool the map onto the patch grid"
        )
    return a


@log_usage(part_of_slo=True)
def token_removal_auc(
    forward_func: nn.Module | ModelAdapter,
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    mode: str = "negative",
    fractions: Sequence[float] | Tensor = DEFAULT_FRACTIONS,
    score: str = "accuracy",
    auc: str = "trapezoid",
    return_curve: bool = False,
    max_examples_per_batch: int | None = None,
    labels: TargetType = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Perturbation AUC by dropping patch tokens from the sequence, ordered by an attribution.

    The protocol of Vilas et al. (Sec. 7-8, ``explain_perturbation.py``): the image tokens
    are ranked by the attribution, and at each removal fraction ``f`` the
    ``round(f * P)`` (round half up, ``floor(f * P + 0.5)``) first-ranked of the P patch
    tokens are **dropped from the sequence after the position embedding**
    (:func:`captum_clsemb.trace.trace` with ``keep_tokens``); prefix tokens (class,
    distillation, register) are always kept. The model then runs on the shorter sequence.

    * ``mode="negative"``: least important first removed (the kept tokens are the most
      important); a good explanation keeps the score up: **higher AUC is better**.
    * ``mode="positive"``: most important first removed; **lower AUC is better**.

    Order and ties: positive sorts the attributions by descending value, negative sorts
    the negated attributions by descending value (Chefer's ``vis = -vis``), both with a
    stable sort, so ties go by the lower patch index (raster order) first in *both* modes.
    A constant attribution therefore gives identical positive and negative curves.

    AUC conventions (``auc``):

    * ``"trapezoid"`` (default): ``torch.trapezoid(curve, x=fractions) * 100`` per example,
      Chefer et al.'s convention; with fractions 0, 0.1, ..., 0.9 a curve flat at 1 scores
      90. The mean over examples is the AUC of the mean curve.
    * ``"authors"``: Vilas et al.'s normalised sum ``sum(m) / (max(m) * P)`` of the mean
      curve ``m`` (P = number of patch tokens), returned per example as
      ``sum(curve_i) / (max(m) * P)`` so that the mean over the call's examples is their
      number. Not an area; see :func:`captum_clsemb.metrics.authors_auc` for its flaws.
      It is their number only on their fractions ``k/P``, k = 1..P-1
      (:func:`captum_clsemb.metrics.auc.authors_fractions`); other fractions give a warning.

    Batching: examples are processed in chunks of ``max_examples_per_batch``; in each chunk
    every removal step is one batched forward over the chunk (sequences of different
    lengths cannot share a batch), and steps with equal token counts share a forward.

    Args:
        forward_func: a supported timm / Hugging Face ViT or its adapter
            (:func:`captum_clsemb.adapters.adapt`).
        inputs: images (N, C, H, W) preprocessed for the model.
        attributions: token importance on the patch grid, (N, num_patches) in raster order
            or (N, 1, h, w) as returned by the package's attribution classes.
        target: class per example (int, list, 1-D tensor) whose probability/logit is
            scored; None uses the model's prediction on the unperturbed input.
        mode: ``"negative"`` or ``"positive"``. Default: ``"negative"``.
        fractions: removal fractions, strictly increasing in [0, 1]. Default: 0, 0.1, ..., 0.9.
            Removing every patch (f = 1) is allowed only where the head reads the class token
            alone (``adapter.pooling == "token"``); the mean of no patches (mean pooling,
            DINOv2's ``[class token, patch mean]``) and an attention pool over no tokens
            (SigLIP) are undefined, and such fractions raise an error.
        score: ``"accuracy"`` (top-1 ``argmax == labels``; ``labels`` None uses ``target``,
            and ``target`` None the clean prediction), ``"probability"`` (softmax of the
            target class) or ``"logit"`` (target logit). Default: ``"accuracy"``.
        auc: ``"trapezoid"`` or ``"authors"``. Default: ``"trapezoid"``.
        return_curve: also return the per-example curves. Default: False.
        max_examples_per_batch: examples per forward pass. Default: all N at once.
        labels: ground-truth classes for ``score="accuracy"``.
    Returns:
        *Tensor* (N,) of per-example AUCs, or ``(auc, curves)`` with curves (N, S) when
        ``return_curve`` is True.

    Examples::

        >>> from captum_clsemb.metrics import token_removal_auc
        >>> attr = ClassEmbeddingGradient(model).attribute(x, target=y)   # (N, 1, h, w)
        >>> neg = token_removal_auc(model, x, attr, target=y, labels=y, mode="negative")
        >>> pos = token_removal_auc(model, x, attr, target=y, labels=y, mode="positive")
        >>> neg.mean(), pos.mean()    # higher / lower is better
    """
    check_options(mode, score, auc)
    adapter = adapt(forward_func)
    x = adapter.check_inputs(inputs)
    n, num_patches = x.shape[0], adapter.num_patches
    fr = check_fractions(fractions)
    counts = tokens_to_remove(fr, num_patches)
    if counts[-1] == num_patches and adapter.pooling != "token":
        # the head reads the patch tokens (their mean, or an attention pool over them): with
        # none left its output is undefined (NaN), not a score
        from captum_clsemb.adapters.base import HEAD_READS

        raise InputValidationError(
            f"removing every patch token (fraction {float(fr[-1]):g}) leaves nothing for the head of "
            f"{type(adapter.model).__name__} to read (it reads {HEAD_READS.get(adapter.pooling, 'the patch tokens')}); "
            "use fractions that keep at least one patch (below 1)"
        )
    order = removal_order(patch_scores(attributions, n, adapter.grid_size).to(x.device), mode)
    tgt, lab = targets_and_labels(target, labels, n, adapter.num_classes, x.device)
    chunk = check_batch_size(max_examples_per_batch, n)
    curves = torch.empty(n, len(counts), dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            xb = x[sl]
            clean = None
            if tgt is None or 0 in counts:
                clean = trace(adapter, xb).logits
            t = tgt[sl] if tgt is not None else clean.argmax(-1)
            lb = lab[sl] if lab is not None else t
            done: dict[int, Tensor] = {}
            for s, k in enumerate(counts):
                if k not in done:
                    logits = clean if k == 0 else trace(adapter, xb, keep_tokens=order[sl, k:]).logits
                    done[k] = score_logits(logits, t, lb, score)
                curves[sl, s] = done[k]
    if auc == "authors" and counts != list(range(1, num_patches)):
        warnings.warn(
            f"auc='authors' is the authors' number only on their fractions k/{num_patches}, k = 1..{num_patches - 1} "
            f"(captum_clsemb.metrics.auc.authors_fractions({num_patches})); with the fractions given it is "
            f"sum(m) / (max(m) * {num_patches}) over {len(counts)} points",
            stacklevel=2,
        )
    result = summarize_curves(curves, fr, auc, num_patches)
    return (result, curves) if return_curve else result
