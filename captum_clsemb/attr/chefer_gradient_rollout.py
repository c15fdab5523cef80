"""Gradient-weighted attention rollout (Chefer, Gur & Wolf, ICCV 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from captum.attr import GradientAttribution
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


class CheferGradientRollout(GradientAttribution):
    r"""Gradient-weighted attention rollout of Chefer et al., "Generic Attention-model
    Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers" (ICCV 2021),
    rules 5-6, for self-attention ViTs.

    With :math:`y_t` the pre-softmax logit of the target class and :math:`A_b` the
    post-softmax attention probabilities of block :math:`b`:

    .. math::
        \bar A_b = \operatorname{mean}_h\big((\nabla_{A_b} y_t \odot A_b)^+\big), \qquad
        R \leftarrow R + \bar A_b R \ \text{ for } b = s, \dots, B-1, \text{ from } R = I,

    and the map is :math:`R[cls, j]` over image tokens :math:`j`. All gradients come from
    one traced forward and one backward for the whole batch; the rollout is computed per
    example (the reference notebook's reshape mixes batch items; this does not). This is the
    "Chefer" baseline of Vilas et al. (NeurIPS 2023), whose ``CheferGradients`` follows the
    same steps. Models without a class token raise
    :class:`~captum_clsemb.errors.InputValidationError`.

    Args:
        forward_func: a supported timm or Hugging Face ViT (or its adapter).

    Examples::

        >>> from captum_clsemb.attr.chefer_gradient_rollout import CheferGradientRollout
        >>> CheferGradientRollout(model).attribute(images, target=labels).shape   # (N, 1, h, w)
    """

    def __init__(self, forward_func: nn.Module | ModelAdapter) -> None:
        self.adapter = adapt(forward_func)
        GradientAttribution.__init__(self, self.adapter.model)

    @log_usage(part_of_slo=True)
    @captum_attribute
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: None = None,
        start_block: int = 0,
        interpolate_to: Sequence[int] | str | None = None,
        internal_batch_size: int | None = None,
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: images (N, C, H, W) preprocessed for the model, or a 1-tuple
                ``(images,)`` (the result is then a 1-tuple too).
            target: class per example in Captum's forms (int, 1-tuple, list of ints,
                tensor (N,) or (N, 1), list of 1-tuples); None uses the predicted class.
            additional_forward_args: must be None (the models take images only).
            start_block: first block of the rollout (negatives count from the end).
                Default: 0, all blocks, as in the ICCV 2021 ViT notebook.
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
        start = select_indices([start_block], adapter.num_blocks, "start_block")[0]
        size = check_interpolate_to(interpolate_to)
        check_batch_size(internal_batch_size)
        tgt = format_target(target, x.shape[0], adapter.num_classes, x.device)
        out = [
            self._attribute_batch(x[sl], None if tgt is None else tgt[sl], start, cls)
            for sl in batch_slices(x.shape[0], internal_batch_size)
        ]
        maps = torch.cat(out, 0).reshape(x.shape[0], 1, *adapter.grid_size)
        return upsample(maps, size)

    def _attribute_batch(self, x: Tensor, target: Tensor | None, start: int, cls: int) -> Tensor:
        adapter = self.adapter
        # The graph is built here whatever the caller's grad mode (no_grad, NoiseTunnel); an input
        # that requires grad guarantees a graph even for a model with frozen weights (the copy also
        # turns a tensor made under inference_mode into a normal one).
        with torch.enable_grad():
            tr = trace(adapter, x.detach().clone().requires_grad_(True), record=["attn_probs"], grad=True)
            if target is None:
                target = tr.logits.argmax(-1)
            blocks = range(start, adapter.num_blocks)
            probs = [tr.cache["attn_probs", b] for b in blocks]
            # Examples are independent, so the gradient of the summed logits is per example.
            score = tr.logits.gather(1, target[:, None]).sum()
            grads = torch.autograd.grad(score, probs)
        with torch.no_grad():
            t = probs[0].shape[-1]
            rollout = torch.eye(t, dtype=probs[0].dtype, device=x.device).expand(x.shape[0], t, t)
            for a, g in zip(probs, grads):
                cam = (g * a).clamp(min=0).mean(1)
                rollout = rollout + cam @ rollout
        return rollout[:, cls, adapter.num_prefix_tokens :]
