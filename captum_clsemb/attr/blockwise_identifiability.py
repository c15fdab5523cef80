"""Class identifiability of every token at every block (paper Sec. 3 and 5, Eq. 1)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_clsemb._utils import TargetType, format_target, rank_of_target
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.attr._explanation_utils import (
    batch_slices,
    captum_attribute,
    check_batch_size,
    check_interpolate_to,
    select_indices,
    upsample,
)
from captum_clsemb.errors import InputValidationError
from captum_clsemb.trace import trace
from captum_clsemb.trace.interventions import AttentionEdit

LAYER_KINDS = {
    "block": "resid_post",
    "attn": "attn_out",
    "mlp": "mlp_out",
    "resid_pre": "resid_pre",
    "resid_mid": "resid_mid",
}


def identifiability_scores(logits: Tensor, target: Tensor) -> Tensor:
    r"""r = 1 - rank / |C| for logits (..., C) and target broadcast over the leading dims.

    The rank is 0-based and counts the classes with a strictly greater logit (ties favour
    the target), so r = 1 exactly when the target is a top-1 class.
    """
    return 1.0 - rank_of_target(logits, target).to(logits.dtype) / logits.shape[-1]


def _block_scores(scores: Tensor, block: int | None) -> Tensor:
    if scores.dim() != 3:
        raise InputValidationError(
            f"expected identifiability scores (N, blocks, tokens), got {tuple(scores.shape)}"
        )
    return scores if block is None else scores[:, block]


def identifiability_rate(scores: Tensor, num_prefix_tokens: int, block: int | None = -1) -> Tensor:
    r"""Percentage of image tokens with identifiability 1 (the paper's Table 1).

    Prefix tokens (class, distillation, register) are excluded; for GAP models without a
    class token ``num_prefix_tokens`` is 0 and every token counts. Per image the share of its
    image tokens is taken, then averaged over images (the authors' convention).

    Args:
        scores: output of :meth:`BlockwiseIdentifiability.attribute`, (N, blocks, T).
        num_prefix_tokens: number of prefix tokens (``adapter.num_prefix_tokens``).
        block: block to read (default: the last); None returns one rate per block.
    Returns:
        a 0-d tensor (or (blocks,) when ``block`` is None), in percent.
    """
    s = _block_scores(scores, block)[..., num_prefix_tokens:]
    return (s == 1).float().mean(-1).mean(0) * 100


def images_with_identifiable_token(scores: Tensor, num_prefix_tokens: int, block: int | None = -1) -> Tensor:
    """Percentage of images with at least one image token of identifiability 1."""
    s = _block_scores(scores, block)[..., num_prefix_tokens:]
    return (s == 1).any(-1).float().mean(0) * 100


def mean_identifiability(scores: Tensor, prefix_tokens: tuple[str, ...]) -> dict[str, Tensor]:
    r"""Mean identifiability per block (the paper's Fig. 2 curves).

    Returns ``{"image": (blocks,)}`` plus ``{"cls": (blocks,)}`` when the model has a class token.
    """
    p = len(prefix_tokens)
    out = {"image": scores[:, :, p:].mean(dim=(0, 2))}
    if "cls" in prefix_tokens:
        out["cls"] = scores[:, :, prefix_tokens.index("cls")].mean(0)
    return out


class BlockwiseIdentifiability(Attribution):
    r"""Class identifiability of every token's state at every block, through the class embedding.

    Each token state is projected onto the class embedding space through the model's own
    classification path (final norm, then the head with its bias; for GAP models ``fc_norm``
    and the head per token) and scored by Eq. 1 of Vilas et al. (NeurIPS 2023)::

        r = 1 - rank(target) / |C|

    with the 0-based rank counting the classes whose logit is strictly greater. r = 1 means
    the target is the token's top-1 class. One batched traced forward serves all blocks;
    per-class logits of a block are reduced to ranks and dropped before the next block.

    Args:
        forward_func: a supported timm or Hugging Face ViT (or its adapter).

    Examples::

        >>> import timm
        >>> from captum_clsemb import BlockwiseIdentifiability
        >>> model = timm.create_model("vit_base_patch32_224", pretrained=False).eval()
        >>> bi = BlockwiseIdentifiability(model)
        >>> scores = bi.attribute(images, target=labels)     # (N, 12, 50)
        >>> bi.identifiability_rate(scores)                   # % image tokens at r = 1, last block
    """

    def __init__(self, forward_func: nn.Module | ModelAdapter) -> None:
        self.adapter = adapt(forward_func)
        Attribution.__init__(self, self.adapter.model)

    @log_usage(part_of_slo=True)
    @captum_attribute
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: None = None,
        layer: str = "block",
        attention_edit: str | AttentionEdit | None = None,
        edit_blocks: Iterable[int] | None = None,
        keep_tokens: Tensor | None = None,
        apply_norm: bool = True,
        include_bias: bool = True,
        head: str = "cls",
        internal_batch_size: int | None = None,
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: images (N, C, H, W) preprocessed for the model, or a 1-tuple
                ``(images,)`` (the result is then a 1-tuple too).
            target: class per example in Captum's forms: int, 1-tuple, list of ints,
                tensor (N,) or (N, 1), list of 1-tuples; None uses the model's predicted
                class (of the same, possibly edited, pass).
            additional_forward_args: must be None (the models take images only).
            layer: ``"block"`` scores the block outputs (residual stream); ``"attn"`` /
                ``"mlp"`` score the sub-layer outputs as added to the residual;
                ``"resid_pre"`` / ``"resid_mid"`` the stream entering the block / after
                attention. Default: ``"block"``.
            attention_edit: ``"self_only"``, ``"no_cls"`` or a callable, see
                :func:`captum_clsemb.trace.trace`.
            edit_blocks: blocks the edit applies to. Default: all.
            keep_tokens: patch indices to keep (N, K) or a boolean mask; the other image
                tokens are dropped after the position embedding.
            apply_norm: apply the final norm before the head. Default: True.
            include_bias: include the head bias. Default: True.
            head: for DeiT-distilled models, ``"cls"``, ``"dist"`` or ``"mean"``.
            internal_batch_size: split the batch into chunks of this size.
        Returns:
            *Tensor* of identifiability scores, (N, num_blocks, num_tokens), tokens in model
            order (prefix tokens first); with ``keep_tokens`` only the kept tokens appear.
            A 1-tuple for tuple inputs. :meth:`patch_map` turns one block's image tokens
            into a patch-grid map.
        """
        adapter = self.adapter
        x = adapter.check_inputs(inputs)
        if layer not in LAYER_KINDS:
            raise InputValidationError(f"layer must be one of {sorted(LAYER_KINDS)}, got {layer!r}")
        check_batch_size(internal_batch_size)
        n = x.shape[0]
        tgt = format_target(target, n, adapter.num_classes, x.device)
        if keep_tokens is not None and not isinstance(keep_tokens, Tensor):
            keep_tokens = torch.as_tensor(keep_tokens)
        chunks = []
        for sl in batch_slices(n, internal_batch_size):
            keep = None
            if keep_tokens is not None:
                keep = keep_tokens if keep_tokens.dim() == 1 else keep_tokens[sl]
            chunks.append(
                self._attribute_batch(
                    x[sl],
                    None if tgt is None else tgt[sl],
                    LAYER_KINDS[layer],
                    attention_edit,
                    edit_blocks,
                    keep,
                    dict(apply_norm=apply_norm, include_bias=include_bias, head=head),
                )  # fmt: skip
            )
        return torch.cat(chunks, 0)

    def _attribute_batch(
        self,
        x: Tensor,
        target: Tensor | None,
        kind: str,
        attention_edit: str | AttentionEdit | None,
        edit_blocks: Iterable[int] | None,
        keep_tokens: Tensor | None,
        lens_kwargs: dict,
    ) -> Tensor:
        adapter = self.adapter
        per_block: list[Tensor] = []

        def score(states: Tensor, tgt: Tensor) -> Tensor:
            return identifiability_scores(adapter.project(states, **lens_kwargs), tgt[:, None])

        if target is not None:
            # Streaming: each block's states become ranks at once; nothing is kept.
            def on_block(b: int, acts: dict[str, Tensor]) -> None:
                per_block.append(score(acts[kind], target))

            trace(adapter, x, record=[kind], attention_edit=attention_edit, edit_blocks=edit_blocks,
                  keep_tokens=keep_tokens, on_block=on_block, store=False)  # fmt: skip
        else:
            # The predicted class is known only after the last block: keep the d-dim states
            # (not the per-class logits) and score block by block afterwards.
            tr = trace(adapter, x, record=[kind], attention_edit=attention_edit, edit_blocks=edit_blocks,
                       keep_tokens=keep_tokens)  # fmt: skip
            pred = tr.logits.argmax(-1)
            per_block = [score(tr.cache[kind, b], pred) for b in range(adapter.num_blocks)]
        return torch.stack(per_block, dim=1)

    def patch_map(
        self, scores: Tensor, block: int = -1, interpolate_to: int | tuple[int, int] | None = None
    ) -> Tensor:
        r"""One block's image-token scores as a map on the patch grid, like the explanation methods.

        Args:
            scores: output of :meth:`attribute` without ``keep_tokens``, (N, blocks, tokens).
            block: the block to read (negatives count from the end). Default: -1, the last.
            interpolate_to: (H, W) (or an int) to upsample to bilinearly. Default: None.
        Returns:
            *Tensor* (N, 1, h, w), (h, w) = ``adapter.grid_size`` (or ``interpolate_to``).
            For maps shaped like the inputs (``captum.metrics.infidelity``), repeat over
            the channels: ``bi.patch_map(s, interpolate_to=x.shape[-2:]).repeat(1, 3, 1, 1)``.
        """
        adapter = self.adapter
        s = _block_scores(scores, None)
        if s.shape[2] != adapter.num_tokens:
            raise InputValidationError(
                f"patch_map needs scores over all {adapter.num_tokens} tokens, got {s.shape[2]} "
                "(scores computed with keep_tokens have no full patch grid)"
            )
        if s.shape[1] != adapter.num_blocks:
            raise InputValidationError(
                f"scores hold {s.shape[1]} blocks but the model has {adapter.num_blocks}; pass attribute's output"
            )
        b = select_indices([block], adapter.num_blocks, "block")[0]
        size = check_interpolate_to(interpolate_to)
        maps = s[:, b, adapter.num_prefix_tokens :].reshape(s.shape[0], 1, *adapter.grid_size)
        return upsample(maps, size)

    def identifiability_rate(self, scores: Tensor, block: int | None = -1) -> Tensor:
        """% of image tokens at identifiability 1 (prefix tokens excluded); see :func:`identifiability_rate`."""
        return identifiability_rate(scores, self.adapter.num_prefix_tokens, block)

    def images_with_identifiable_token(self, scores: Tensor, block: int | None = -1) -> Tensor:
        """% of images with at least one image token at identifiability 1."""
        return images_with_identifiable_token(scores, self.adapter.num_prefix_tokens, block)

    def mean_identifiability(self, scores: Tensor) -> dict[str, Tensor]:
        """Mean score per block for the class token and the image tokens (Fig. 2)."""
        return mean_identifiability(scores, self.adapter.prefix_tokens)
