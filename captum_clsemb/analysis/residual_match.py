r"""Residual-stream top-1 match: which component's prediction the block output keeps (Fig. 3c).

For each token and block, the top-1 class (through ``adapter.project``) of the block output
(``resid_post``) is compared with the top-1 class of the attention output (``attn_out``),
of the MLP output (``mlp_out``) and of the incoming residual stream (``resid_pre``). Each
token falls in exactly one category, by priority::

    "attn"       top-1 equals the attention output's
    "mlp"        otherwise, top-1 equals the MLP output's
    "residual"   otherwise, top-1 equals the incoming residual's
    "composite"  none of them: the stream built a new prediction

so the four shares sum to 100 %. When several components share the block's top-1 class
(e.g. attention and MLP both predict it), the token counts for the first of them in this
order. The authors' code checked the attention match twice and the MLP match never, and
let the categories overlap (bars above 100 %); ``exclusive=False`` gives the overlapping
per-component match rates without that bug.
"""

from __future__ import annotations

import torch
from captum.log import log_usage
from torch import Tensor, nn

from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.analysis._common import DataType, RateAccumulator, iter_batches, token_groups
from captum_clsemb.errors import InputValidationError
from captum_clsemb.trace import trace

CATEGORIES = ("attn", "mlp", "residual", "composite")
_SOURCES = {"attn": "attn_out", "mlp": "mlp_out", "residual": "resid_pre"}


def _matches_batch(adapter: ModelAdapter, x: Tensor, lens: dict) -> dict[str, Tensor]:
    """(N, blocks, T) bool: block top-1 equals each source's top-1."""
    out: dict[str, list[Tensor]] = {name: [] for name in _SOURCES}

    def on_block(b: int, acts: dict[str, Tensor]) -> None:
        top = adapter.project(acts["resid_post"], **lens).argmax(-1)
        for name, kind in _SOURCES.items():
            out[name].append(adapter.project(acts[kind], **lens).argmax(-1) == top)

    trace(adapter, x, record={"resid_post", *_SOURCES.values()}, on_block=on_block, store=False)
    return {name: torch.stack(v, 1) for name, v in out.items()}


def _categorise(matches: dict[str, Tensor]) -> Tensor:
    """Exclusive category index (N, blocks, T): 0 attn, 1 mlp, 2 residual, 3 composite."""
    cat = torch.full_like(matches["attn"], CATEGORIES.index("composite"), dtype=torch.long)
    for i in reversed(range(3)):  # lowest priority first, so higher priorities overwrite
        cat = torch.where(matches[CATEGORIES[i]], torch.full_like(cat, i), cat)
    return cat


@log_usage(part_of_slo=True)
def residual_match(
    forward_func: nn.Module | ModelAdapter,
    inputs: Tensor,
    apply_norm: bool = True,
    include_bias: bool = True,
    internal_batch_size: int | None = None,
) -> Tensor:
    r"""Exclusive residual-match category of every token at every block.

    Args:
        forward_func: a supported ViT or its adapter.
        inputs: images (N, C, H, W).
        apply_norm, include_bias: lens options of :meth:`ModelAdapter.project`.
        internal_batch_size: split the batch into chunks of this size.
    Returns:
        *Tensor* long (N, num_blocks, num_tokens): index into :data:`CATEGORIES`
        (0 ``attn``, 1 ``mlp``, 2 ``residual``, 3 ``composite``).

    Examples::

        >>> cat = residual_match(model, images)
        >>> (cat[:, -1] == CATEGORIES.index("attn")).float().mean()
    """
    adapter = adapt(forward_func)
    lens = dict(apply_norm=apply_norm, include_bias=include_bias)
    parts = [
        _categorise(_matches_batch(adapter, x, lens))
        for x, _, _ in iter_batches(adapter, inputs, None, None, internal_batch_size)
    ]
    if not parts:
        raise InputValidationError("inputs hold no images")
    return torch.cat(parts)


@log_usage(part_of_slo=True)
def residual_match_rate(
    forward_func: nn.Module | ModelAdapter,
    inputs: DataType,
    exclusive: bool = True,
    apply_norm: bool = True,
    include_bias: bool = True,
    internal_batch_size: int | None = None,
) -> dict[str, dict[str, Tensor]]:
    r"""Residual-match shares per block, streamed over a dataset (paper Fig. 3c).

    Args:
        forward_func: a supported ViT or its adapter.
        inputs: an image tensor or an iterable of batches (labels are ignored).
        exclusive: True (default) gives the exclusive categories of :data:`CATEGORIES`,
            summing to 100 % per block; False gives, for ``attn``/``mlp``/``residual``, the
            share of tokens matching that component whatever the others do, and
            ``composite`` = matching none (these can sum to more than 100 %).
        apply_norm, include_bias: lens options of :meth:`ModelAdapter.project`.
        internal_batch_size: chunk size for tensor inputs.
    Returns:
        ``{group: {category: (num_blocks,) float64 percent}}`` for groups ``"all"`` (every
        token, prefix included, as the authors), ``"image"`` and, for class-token models,
        ``"cls"``.
    """
    adapter = adapt(forward_func)
    lens = dict(apply_norm=apply_norm, include_bias=include_bias)
    groups: dict[str, slice | int] = {"all": slice(None), **token_groups(adapter)}
    acc = RateAccumulator(adapter.num_blocks)
    seen = 0
    for x, _, _ in iter_batches(adapter, inputs, None, None, internal_batch_size):
        matches = _matches_batch(adapter, x, lens)
        seen += x.shape[0]
        if exclusive:
            cat = _categorise(matches)
            hits = {name: cat == i for i, name in enumerate(CATEGORIES)}
        else:
            hits = dict(matches)
            hits["composite"] = ~(matches["attn"] | matches["mlp"] | matches["residual"])
        for group, pos in groups.items():
            for name, h in hits.items():
                g = h[:, :, pos]
                acc.add_mask(f"{group}/{name}", g[..., None] if g.dim() == 2 else g)
    if seen == 0:
        raise InputValidationError("inputs hold no images")
    return {group: {name: acc.percent(f"{group}/{name}") for name in CATEGORIES} for group in groups}
