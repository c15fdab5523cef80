"""Small helpers shared by attributions and metrics.

The tuple helpers mirror Captum's private ``captum._utils.common`` functions of the same
purpose; they are vendored (a few lines) so that we do not depend on private names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

from captum_clsemb.errors import InputValidationError

TargetType = Union[None, int, Sequence[int], Tensor]  # noqa: UP007 (runtime alias)


def is_tuple(inputs: object) -> bool:
    return isinstance(inputs, tuple)


def format_output(is_inputs_tuple: bool, output: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    return output if is_inputs_tuple else output[0]


def format_target(
    target: TargetType, num_examples: int, num_classes: int, device: torch.device
) -> Tensor | None:
    """Turn a Captum-style target into a LongTensor of shape (N,), or None.

    Accepts an int (same class for every example), a list/tuple of ints or a 1-D tensor
    of length N (one class per example), a 0-d tensor, or None (caller uses the prediction).
    """
    if target is None:
        return None
    if isinstance(target, bool):
        raise InputValidationError(
            "target must be an int class index, a list of ints or a 1-D tensor, not a bool"
        )
    if isinstance(target, int):
        t = torch.full((num_examples,), target, dtype=torch.long)
    elif isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex():
            raise InputValidationError(
                f"target tensor must hold integer class indices, got dtype {target.dtype}; use target.long()"
            )
        if target.dim() == 0:
            t = target.reshape(1).expand(num_examples).long()
        elif target.dim() == 1:
            t = target.long()
        else:
            raise InputValidationError(
                f"target tensor must be 0-d or 1-D (one class per example), got shape {tuple(target.shape)}"
            )
    elif isinstance(target, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in target):
            raise InputValidationError("a target list must contain one int class index per example")
        t = torch.tensor(list(target), dtype=torch.long)
    else:
        raise InputValidationError(
            f"unsupported target type {type(target).__name__}; use an int, a list of ints or a 1-D tensor"
        )
    if t.numel() != num_examples:
        raise InputValidationError(
            f"target has {t.numel()} entries but inputs hold {num_examples} examples; "
            "give one target per example or a single int for all"
        )
    if num_examples and (t.min() < 0 or t.max() >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)][0].item()
        raise InputValidationError(
            f"target {bad} is out of range: the model has {num_classes} classes (valid targets 0..{num_classes - 1})"
        )
    return t.to(device)


def rank_of_target(logits: Tensor, target: Tensor) -> Tensor:
    """0-based rank of the target class: the number of classes with a strictly greater logit.

    ``logits`` is (..., C) and ``target`` broadcasts against ``logits[..., 0]``. No sort.
    """
    target_logit = logits.gather(-1, target.unsqueeze(-1).expand(*logits.shape[:-1], 1))
    return (logits > target_logit).sum(-1)
