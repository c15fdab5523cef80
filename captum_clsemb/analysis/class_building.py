r"""How attention and MLP sub-layers build class representations (paper Sec. 6, Fig. 3b).

The class similarity change of a sub-layer at a token is whether the target-class logit of
its output exceeds that of its input, both read through the class embedding lens
(``adapter.project``: final norm, head with bias)::

    attn:  logit_c(attn_out)  >  logit_c(resid_pre)     # the attention sub-layer's input
    mlp:   logit_c(mlp_out)   >  logit_c(resid_mid)     # the MLP's input: stream after attention

The rate is the share of tokens where it holds, per block, for the class token and the
image tokens.
"""

from __future__ import annotations

import torch
from captum.log import log_usage
from torch import Tensor, nn

from captum_clsemb._utils import TargetType
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.analysis._common import DataType, RateAccumulator, iter_batches, token_groups
from captum_clsemb.errors import InputValidationError
from captum_clsemb.trace import trace

MLP_INPUTS = {"true": "resid_mid", "previous_block": "resid_pre"}


def _change_batch(
    adapter: ModelAdapter, x: Tensor, target: Tensor | None, mlp_input: str, lens: dict
) -> tuple[Tensor, Tensor]:
    """(N, blocks, T) bool change indicators for attention and MLP of one batch."""
    if target is None:  # the prediction is known only after the pass: one plain pass first
        target = trace(adapter, x).logits.argmax(-1)
    mlp_in = MLP_INPUTS[mlp_input]
    kinds = {"resid_pre", "attn_out", "mlp_out", mlp_in}
    attn: list[Tensor] = []
    mlp: list[Tensor] = []
    idx = target[:, None, None]

    def logit(states: Tensor) -> Tensor:
        lg = adapter.project(states, **lens)
        return lg.gather(-1, idx.expand(-1, lg.shape[1], 1))[..., 0]

    def on_block(b: int, acts: dict[str, Tensor]) -> None:
        attn.append(logit(acts["attn_out"]) > logit(acts["resid_pre"]))
        mlp.append(logit(acts["mlp_out"]) > logit(acts[mlp_in]))

    trace(adapter, x, record=kinds, on_block=on_block, store=False)
    return torch.stack(attn, 1), torch.stack(mlp, 1)


def _check_mlp_input(mlp_input: str) -> str:
    if mlp_input not in MLP_INPUTS:
        raise InputValidationError(f"mlp_input must be one of {sorted(MLP_INPUTS)}, got {mlp_input!r}")
    return mlp_input


@log_usage(part_of_slo=True)
def class_similarity_change(
    forward_func: nn.Module | ModelAdapter,
    inputs: Tensor,
    target: TargetType = None,
    mlp_input: str = "true",
    apply_norm: bool = True,
    include_bias: bool = True,
    internal_batch_size: int | None = None,
) -> dict[str, Tensor]:
    r"""Per token and block: does the sub-layer raise the target logit above its input's?

    Args:
        forward_func: a supported ViT or its adapter.
        inputs: images (N, C, H, W).
        target: class per example; None uses the model's prediction (one extra plain pass).
        mlp_input: ``"true"`` compares the MLP output with the MLP's true input, the
            residual stream after attention (``resid_mid``), as the paper's text says;
            ``"previous_block"`` compares it with the block input (``resid_pre``, the
            previous block's output), the authors' code.
        apply_norm, include_bias: lens options of :meth:`ModelAdapter.project` (defaults as
            the authors: final norm and head bias on both sides).
        internal_batch_size: split the batch into chunks of this size.
    Returns:
        ``{"attn": bool (N, blocks, T), "mlp": bool (N, blocks, T)}``, tokens in model order.

    Examples::

        >>> ch = class_similarity_change(model, images, target=labels)
        >>> ch["mlp"][:, -2].float().mean()     # share of tokens the penultimate MLP pushes up
    """
    adapter = adapt(forward_func)
    _check_mlp_input(mlp_input)
    lens = dict(apply_norm=apply_norm, include_bias=include_bias)
    parts = [
        _change_batch(adapter, x, t, mlp_input, lens)
        for x, t, _ in iter_batches(adapter, inputs, target, None, internal_batch_size)
    ]
    if not parts:
        raise InputValidationError("inputs hold no images")
    return {"attn": torch.cat([p[0] for p in parts]), "mlp": torch.cat([p[1] for p in parts])}


@log_usage(part_of_slo=True)
def class_similarity_change_rate(
    forward_func: nn.Module | ModelAdapter,
    inputs: DataType,
    target: TargetType = None,
    mlp_input: str = "true",
    apply_norm: bool = True,
    include_bias: bool = True,
    internal_batch_size: int | None = None,
) -> dict[str, dict[str, Tensor]]:
    r"""Class similarity change rates per block, streamed over a dataset (paper Fig. 3b).

    Unlike the authors' code, which starts at the second block because it compares with the
    previous block's saved output, every block is reported: block 0's input is the
    embedded sequence.

    Args:
        forward_func: a supported ViT or its adapter.
        inputs: an image tensor (N, C, H, W) with ``target``, or an iterable of
            ``(images, labels)`` batches (labels None: the prediction).
        target, mlp_input, apply_norm, include_bias: see :func:`class_similarity_change`.
        internal_batch_size: chunk size for tensor inputs.
    Returns:
        ``{"attn": {...}, "mlp": {...}}``, each with float64 (num_blocks,) percentages for
        ``"image"`` (pooled image tokens) and, for class-token models, ``"cls"``.
    """
    adapter = adapt(forward_func)
    _check_mlp_input(mlp_input)
    lens = dict(apply_norm=apply_norm, include_bias=include_bias)
    groups = token_groups(adapter)
    acc = RateAccumulator(adapter.num_blocks)
    seen = 0
    for x, t, _ in iter_batches(adapter, inputs, target, None, internal_batch_size):
        changes = dict(zip(("attn", "mlp"), _change_batch(adapter, x, t, mlp_input, lens)))
        seen += x.shape[0]
        for layer, ch in changes.items():
            for name, pos in groups.items():
                c = ch[:, :, pos]
                acc.add_mask(f"{layer}/{name}", c[..., None] if c.dim() == 2 else c)
    if seen == 0:
        raise InputValidationError("inputs hold no images")
    return {layer: {name: acc.percent(f"{layer}/{name}") for name in groups} for layer in ("attn", "mlp")}
