r"""Dataset-level identifiability curves (paper Sec. 5, Fig. 2), streamed over batches."""

from __future__ import annotations

from collections.abc import Iterable

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
from captum_clsemb.attr.blockwise_identifiability import BlockwiseIdentifiability
from captum_clsemb.errors import InputValidationError
from captum_clsemb.trace.interventions import AttentionEdit


def accumulate_scores(
    acc: RateAccumulator, scores: Tensor, groups: dict[str, slice | int], prefix: str = ""
) -> None:
    """Add identifiability scores (N, blocks, T) of one batch: means and rates (score == 1)."""
    for name, pos in groups.items():
        s = scores[:, :, pos]
        s = s[..., None] if s.dim() == 2 else s
        acc.add_mask(f"{prefix}mean/{name}", s)
        acc.add_mask(f"{prefix}rate/{name}", s == 1)


def summary_from(
    acc: RateAccumulator, groups: Iterable[str], prefix: str = ""
) -> dict[str, dict[str, Tensor]]:
    return {
        "mean": {g: acc.mean(f"{prefix}mean/{g}") for g in groups},
        "rate": {g: acc.percent(f"{prefix}rate/{g}") for g in groups},
    }


@log_usage(part_of_slo=True)
def identifiability_summary(
    forward_func: nn.Module | ModelAdapter,
    inputs: DataType,
    target: TargetType = None,
    layer: str = "block",
    attention_edit: str | AttentionEdit | None = None,
    edit_blocks: Iterable[int] | None = None,
    internal_batch_size: int | None = None,
) -> dict[str, dict[str, Tensor]]:
    r"""Mean identifiability and identifiability rate per block over a dataset.

    Scores are :class:`~captum_clsemb.attr.BlockwiseIdentifiability`'s (Eq. 1 through the
    model's own norm and head). Image-token values pool tokens (equal to the mean over
    images of per-image values, as every image has the same number of tokens); class-token
    values average over images. Prefix tokens other than the class token are excluded.

    Args:
        forward_func: a supported ViT or its adapter.
        inputs: an image tensor (N, C, H, W) with ``target``, or an iterable of
            ``(images, labels)`` batches (labels None: the model's prediction).
        target: labels for tensor inputs; None uses the prediction of the unedited model
            (also when ``attention_edit`` is given, so clean and edited runs share targets).
        layer: see :meth:`BlockwiseIdentifiability.attribute` (default ``"block"``).
        attention_edit, edit_blocks: optional attention edit, see :func:`captum_clsemb.trace.trace`.
        internal_batch_size: chunk size for tensor inputs.
    Returns:
        ``{"mean": {group: (blocks,)}, "rate": {group: (blocks,)}}`` for groups ``"image"``
        and (class-token models) ``"cls"``; means in [0, 1], rates in percent (float64).

    Examples::

        >>> curves = identifiability_summary(model, loader)
        >>> curves["mean"]["image"], curves["rate"]["cls"]
    """
    adapter = adapt(forward_func)
    bi = BlockwiseIdentifiability(adapter)
    groups = token_groups(adapter)
    acc = RateAccumulator(adapter.num_blocks)
    seen = 0
    for x, t, _ in iter_batches(adapter, inputs, target, None, internal_batch_size):
        if attention_edit is not None:
            t = target_or_prediction(adapter, x, t)
        scores = bi.attribute(
            x, target=t, layer=layer, attention_edit=attention_edit, edit_blocks=edit_blocks
        )
        accumulate_scores(acc, scores, groups)
        seen += x.shape[0]
    if seen == 0:
        raise InputValidationError("inputs hold no images")
    return summary_from(acc, groups)
