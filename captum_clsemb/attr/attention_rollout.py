"""Attention rollout (Abnar & Zuidema, ACL 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_clsemb._utils import TargetType, format_target
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.attr._explanation_utils import (
    batch_slices,
    captum_attribute,
    check_batch_size,
    check_interpolate_to,
    require_class_token,
    select_indices,
    upsample,
)
from captum_clsemb.errors import InputValidationError
from captum_clsemb.trace import trace

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(probs: Tensor, head_fusion: str) -> Tensor:
    """(N, heads, T, T) -> (N, T, T) by the mean, max or min over heads."""
    if head_fusion == "mean":
        return probs.mean(1)
    if head_fusion == "max":
        return probs.amax(1)
    return probs.amin(1)


def discard_lowest(fused: Tensor, discard_ratio: float, protect: int) -> Tensor:
    r"""Zero, per example, the ``int(T*T*discard_ratio)`` smallest entries of (N, T, T) maps.

    The entry ``[protect, protect]`` (class token to itself) is never zeroed.
    """
    n, t, _ = fused.shape
    k = min(int(t * t * discard_ratio), t * t - 1)
    if k == 0:
        return fused
    flat = fused.reshape(n, t * t)
    key = flat.clone()
    key[:, protect * t + protect] = float("inf")
    idx = key.topk(k, dim=1, largest=False).indices
    return flat.scatter(1, idx, 0.0).reshape(n, t, t)


class AttentionRollout(Attribution):
    r"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020).

    For every block :math:`b \ge` ``start_block``, the heads are fused into
    :math:`\bar A_b` (mean, max or min over heads), optionally the lowest ``discard_ratio``
    fraction of its :math:`T^2` entries is zeroed (per example and per block, never the
    class-to-class entry), the residual is added and rows are normalised:

    .. math::
        \hat A_b = \operatorname{rownorm}\big(0.5\,\bar A_b + 0.5\,I\big), \qquad
        R = \hat A_{B-1} \cdots \hat A_{s}

    (later blocks multiply on the left). The map is :math:`R[cls, j]` over image tokens
    :math:`j`. Rows are normalised row-wise (``sum(-1, keepdim=True)``), unlike
    vit-explain's column-dividing ``a / a.sum(dim=-1)``. The product is accumulated block by
    block during the forward, so no attention matrix is kept.

    **Defaults** follow Abnar & Zuidema's definition: mean fusion, no discarding, all blocks
    (``start_block=0``). Chefer et al.'s ImageNet benchmark scripts (the protocol of the
    perturbation tests in Chefer et al. 2021 and Vilas et al. 2023) call rollout with
    ``start_layer=1``: pass ``start_block=1`` to reproduce them. vit-explain's command-line
    defaults are ``head_fusion="max", discard_ratio=0.9``.

    Models without a class token raise :class:`~captum_clsemb.errors.InputValidationError`.

    Args:
        forward_func: a supported timm or Hugging Face ViT (or its adapter).

    Examples::

        >>> from captum_clsemb.attr.attention_rollout import AttentionRollout
        >>> AttentionRollout(model).attribute(images).shape          # (N, 1, h, w)
        >>> AttentionRollout(model).attribute(images, head_fusion="max", discard_ratio=0.9)
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
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        start_block: int = 0,
        interpolate_to: Sequence[int] | str | None = None,
        internal_batch_size: int | None = None,
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: images (N, C, H, W) preprocessed for the model, or a 1-tuple
                ``(images,)`` (the result is then a 1-tuple too).
            target: accepted (and validated) for a uniform interface with the gradient
                methods; rollout does not depend on the class, so it is otherwise unused.
            additional_forward_args: must be None (the models take images only).
            head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads. Default: ``"mean"``.
            discard_ratio: fraction in [0, 1) of the lowest fused entries zeroed per
                example and block before adding the residual. Default: 0.0.
            start_block: first block of the product (negatives count from the end).
                Default: 0 (all blocks); Chefer et al.'s ImageNet protocol uses 1.
            interpolate_to: (H, W) to upsample the map to bilinearly
                (``LayerAttribution.interpolate``), or ``"input"`` for (N, C, H, W) maps
                shaped like the inputs. Default: None (patch grid).
            internal_batch_size: split the batch into chunks of this many images.
        Returns:
            *Tensor* (N, 1, h, w), (h, w) = ``adapter.grid_size`` (or ``interpolate_to``;
            (N, C, H, W) for ``"input"``); a 1-tuple for tuple inputs.
        """
        adapter = self.adapter
        x = adapter.check_inputs(inputs)
        cls = require_class_token(adapter, type(self).__name__)
        if head_fusion not in HEAD_FUSIONS:
            raise InputValidationError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
        if (
            isinstance(discard_ratio, bool)
            or not isinstance(discard_ratio, (int, float))
            or not 0 <= discard_ratio < 1
        ):
            raise InputValidationError(f"discard_ratio must be a number in [0, 1), got {discard_ratio!r}")
        start = select_indices([start_block], adapter.num_blocks, "start_block")[0]
        size = check_interpolate_to(interpolate_to)
        check_batch_size(internal_batch_size)
        format_target(target, x.shape[0], adapter.num_classes, x.device)
        p = adapter.num_prefix_tokens
        out = []
        for sl in batch_slices(x.shape[0], internal_batch_size):
            state: dict[str, Tensor] = {}

            def on_block(b: int, acts: dict[str, Tensor], _state=state) -> None:
                if b < start:
                    return
                fused = fuse_heads(acts["attn_probs"], head_fusion)
                if discard_ratio > 0:
                    fused = discard_lowest(fused, discard_ratio, cls)
                eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
                a_hat = 0.5 * fused + 0.5 * eye
                a_hat = a_hat / a_hat.sum(-1, keepdim=True)
                _state["R"] = a_hat if "R" not in _state else a_hat @ _state["R"]

            trace(
                adapter,
                x[sl],
                record=["attn_probs"],
                on_block=on_block,
                store=False,
                record_blocks=range(start, adapter.num_blocks),
            )  # blocks below start: fused
            out.append(state["R"][:, cls, p:])
        maps = torch.cat(out, 0).reshape(x.shape[0], 1, *adapter.grid_size)
        return upsample(maps, size)
