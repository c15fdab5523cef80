"""Raw attention of the class token (the baseline in Chefer et al. 2021)."""

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
from captum_clsemb.trace import trace


class RawAttention(Attribution):
    r"""The attention the class token pays to each image token in one block, averaged over heads.

    .. math:: \mathrm{map}_j = \frac{1}{H} \sum_h A_b[h, cls, j]

    for image tokens :math:`j` (prefix tokens excluded), as the "raw attention" baseline of
    Chefer et al. (CVPR 2021), which uses the last block. The traced forward makes the
    probabilities of that block explicit (the other blocks run fused attention), so fused
    attention (timm) and SDPA (Hugging Face) need not be switched off. Models without a class token raise
    :class:`~captum_clsemb.errors.InputValidationError`.

    Args:
        forward_func: a supported timm or Hugging Face ViT (or its adapter).

    Examples::

        >>> from captum_clsemb.attr.raw_attention import RawAttention
        >>> RawAttention(model).attribute(images).shape            # (N, 1, h, w)
        >>> RawAttention(model).attribute(images, block=0, interpolate_to=(224, 224))
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
        block: int = -1,
        interpolate_to: Sequence[int] | str | None = None,
        internal_batch_size: int | None = None,
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: images (N, C, H, W) preprocessed for the model, or a 1-tuple
                ``(images,)`` (the result is then a 1-tuple too).
            target: accepted (and validated) for a uniform interface with the gradient
                methods, e.g. in perturbation benchmarks; attention does not depend on the
                class, so it is otherwise unused.
            additional_forward_args: must be None (the models take images only).
            block: the block whose attention is read (negatives count from the end).
                Default: -1, the last block.
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
        b_sel = select_indices([block], adapter.num_blocks, "block")[0]
        size = check_interpolate_to(interpolate_to)
        check_batch_size(internal_batch_size)
        format_target(target, x.shape[0], adapter.num_classes, x.device)
        p = adapter.num_prefix_tokens
        out = []
        for sl in batch_slices(x.shape[0], internal_batch_size):
            got: dict[str, Tensor] = {}

            def on_block(b: int, acts: dict[str, Tensor], _got=got) -> None:
                if b == b_sel:
                    _got["row"] = acts["attn_probs"][:, :, cls, p:].mean(1)

            # Only the read block materialises its attention; the others run fused attention.
            trace(
                adapter, x[sl], record=["attn_probs"], on_block=on_block, store=False, record_blocks=[b_sel]
            )
            out.append(got["row"])
        maps = torch.cat(out, 0).reshape(x.shape[0], 1, *adapter.grid_size)
        return upsample(maps, size)
