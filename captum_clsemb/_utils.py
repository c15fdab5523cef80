"""Small helpers shared by attributions and metrics.

The tuple helpers mirror Captum's private ``captum._utils.common`` functions of the same
purpose; they are vendored (a few lines) so that we do not depend on private names.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

from captum_clsemb.errors import InputValidationError, NonFiniteInputError

# Captum's TargetType: None, int, tuple, tensor, list of ints, list of tuples
TargetType = Union[None, int, tuple[int, ...], Tensor, Sequence[int], Sequence[tuple[int, ...]]]  # noqa: UP007


def is_tuple(inputs: object) -> bool:
    return isinstance(inputs, tuple)


def format_output(is_inputs_tuple: bool, output: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    return output if is_inputs_tuple else output[0]


def format_inputs(inputs: object) -> tuple[object, bool]:
    r"""Captum's input forms for single-input models: a tensor, or a 1-tuple of one tensor.

    Returns ``(inputs, is_inputs_tuple)`` with a 1-tuple unwrapped; the value itself is
    checked later (:meth:`captum_clsemb.adapters.ModelAdapter.check_inputs`). A tuple of
    several tensors is an error: a ViT takes one image tensor.
    """
    if isinstance(inputs, tuple):
        if len(inputs) != 1:
            raise InputValidationError(
                f"inputs is a tuple of {len(inputs)} items, but a ViT takes one image tensor: pass "
                "images (N, C, H, W) or a 1-tuple (images,)"
            )
        return inputs[0], True
    return inputs, False


def check_additional_forward_args(additional_forward_args: object) -> None:
    """Captum's ``additional_forward_args``: only None, since the models take images only."""
    if additional_forward_args is not None:
        raise InputValidationError(
            "additional_forward_args must be None: the ViT adapters take images only (the image tensor is "
            f"the model's one input), got {type(additional_forward_args).__name__}. Leave it out, or wrap a "
            "model that needs extra inputs so that it takes images only"
        )


def check_batch_size(internal_batch_size: int | None, name: str = "internal_batch_size") -> None:
    """None, or a positive int (not a bool)."""
    if internal_batch_size is not None and (
        isinstance(internal_batch_size, bool)
        or not isinstance(internal_batch_size, numbers.Integral)
        or internal_batch_size < 1
    ):
        raise InputValidationError(f"{name} must be a positive int or None, got {internal_batch_size!r}")


def _describe_indices(indices: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    more = f", ... ({len(indices)} in total)" if len(indices) > limit else ""
    return f"[{shown}{more}]"


def check_finite(inputs: Tensor, what: str = "inputs", first_index: int = 0) -> None:
    r"""Raise :class:`~captum_clsemb.errors.NonFiniteInputError` if any example holds NaN or inf.

    One sum over the batch (NaN and inf propagate through a sum, so a finite sum proves every
    value finite); an ``isfinite`` pass runs only when the sum is not finite (a non-finite value,
    or an overflow), and the offending examples are found only when that fails.
    ``first_index`` offsets the reported indices (for a batch taken from a larger stream).
    """
    if inputs.dim() == 0 or not (inputs.is_floating_point() or inputs.is_complex()):
        return
    if bool(torch.isfinite(inputs.sum())):
        return
    finite = torch.isfinite(inputs)
    if bool(finite.all()):
        return
    bad = (~finite.reshape(inputs.shape[0], -1).all(1)).nonzero()[:, 0] + first_index
    indices = bad.tolist()
    raise NonFiniteInputError(
        f"{what} contain NaN or infinite values in {len(indices)} of {inputs.shape[0]} examples, at indices "
        f"{_describe_indices(indices)}; results on them would be meaningless. Drop or repair those images "
        "(check the loading and normalisation) and call again",
        indices,
    )


def _is_index(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def format_target(
    target: TargetType, num_examples: int, num_classes: int, device: torch.device
) -> Tensor | None:
    r"""Turn a Captum-style target into a LongTensor of shape (N,), or None.

    The forms of Captum's ``target`` for a classifier with (N, C) outputs:

    - an int, a 0-d tensor or any one-element tensor, or a 1-tuple ``(c,)``: class ``c`` for
      every example;
    - a list of N ints, a tensor (N,) or (N, 1), or a list of N 1-tuples/1-lists: one class
      per example;
    - None: the caller uses the prediction.

    A longer tuple is an error (in Captum it indexes further output dimensions, which
    logits do not have).
    """
    if target is None:
        return None
    if isinstance(target, bool):
        raise InputValidationError(
            "target must be an int class index, a list of ints or a tensor, not a bool"
        )
    if _is_index(target):
        _check_class(int(target), num_classes)
        t = torch.full((num_examples,), int(target), dtype=torch.long)
    elif isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise InputValidationError(
                f"target tensor must hold integer class indices, got dtype {target.dtype}; use target.long()"
            )
        if target.numel() == 1:
            t = target.reshape(1).expand(num_examples).long()
        elif target.dim() == 1 or (target.dim() == 2 and target.shape[1] == 1):
            t = target.reshape(-1).long()
        else:
            raise InputValidationError(
                f"target tensor must be (N,) or (N, 1), one class per example, got shape {tuple(target.shape)}"
            )
    elif isinstance(target, tuple):
        if len(target) != 1 or not _is_index(target[0]):
            raise InputValidationError(
                f"a tuple target indexes the output's dimensions (Captum), and logits have one class dimension: "
                f"give (c,) for class c for every example, or a list of N ints for one class per example; "
                f"got {target!r}"
            )
        _check_class(int(target[0]), num_classes)
        t = torch.full((num_examples,), int(target[0]), dtype=torch.long)
    elif isinstance(target, list):
        if all(_is_index(v) for v in target):
            values = [int(v) for v in target]
        elif all(isinstance(v, (tuple, list)) and len(v) == 1 and _is_index(v[0]) for v in target):
            values = [int(v[0]) for v in target]
        else:
            raise InputValidationError(
                "a target list must hold one class per example: N ints or N 1-tuples (c,), got "
                f"{_short(target)}"
            )
        for v in values:
            _check_class(v, num_classes)
        t = torch.tensor(values, dtype=torch.long)
    else:
        raise InputValidationError(
            f"unsupported target type {type(target).__name__}; use an int, a list of ints or a tensor (N,)"
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


def _check_class(c: int, num_classes: int) -> None:
    if not 0 <= c < num_classes:
        raise InputValidationError(
            f"target {c} is out of range: the model has {num_classes} classes (valid targets 0..{num_classes - 1})"
        )


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def rank_of_target(logits: Tensor, target: Tensor) -> Tensor:
    """0-based rank of the target class: the number of classes with a strictly greater logit.

    ``logits`` is (..., C) and ``target`` broadcasts against ``logits[..., 0]``. No sort.
    """
    target_logit = logits.gather(-1, target.unsqueeze(-1).expand(*logits.shape[:-1], 1))
    return (logits > target_logit).sum(-1)
