"""Helpers shared by the removal metrics: option checks, removal order, scoring."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from captum_clsemb._utils import TargetType, format_target
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.errors import InputValidationError, UnsupportedModelError
from captum_clsemb.metrics.auc import AUC_CONVENTIONS, MODES, SCORES


def check_options(mode: str, score: str, auc: str) -> None:
    if mode not in MODES:
        raise InputValidationError(
            f"mode must be 'negative' (least important removed first) or 'positive' (most important first), got {mode!r}"
        )
    if score not in SCORES:
        raise InputValidationError(f"score must be one of {SCORES}, got {score!r}")
    if auc not in AUC_CONVENTIONS:
        raise InputValidationError(f"auc must be one of {AUC_CONVENTIONS}, got {auc!r}")


def check_batch_size(max_examples_per_batch: int | None, default: int) -> int:
    if max_examples_per_batch is None:
        return max(default, 1)
    if isinstance(max_examples_per_batch, bool) or not isinstance(max_examples_per_batch, int):
        raise InputValidationError("max_examples_per_batch must be a positive int or None")
    if max_examples_per_batch < 1:
        raise InputValidationError(f"max_examples_per_batch must be >= 1, got {max_examples_per_batch}")
    return max_examples_per_batch


def real_attributions(attributions: object) -> Tensor:
    """A tensor (or Captum's 1-tuple of one) of real numbers, as float; a clear error otherwise."""
    a = attributions
    if isinstance(a, tuple) and len(a) == 1:
        a = a[0]
    if not isinstance(a, Tensor):
        raise InputValidationError(f"attributions must be a tensor, got {type(a).__name__}")
    if a.dtype == torch.bool or a.is_complex():
        raise InputValidationError(f"attributions must hold real numbers, got dtype {a.dtype}; use .float()")
    return a if a.is_floating_point() else a.float()


def input_checker(forward_func: object) -> ModelAdapter | None:
    """The adapter of a supported ViT (to validate its inputs), or None for any other classifier."""
    if isinstance(forward_func, ModelAdapter):
        return forward_func
    if isinstance(forward_func, torch.nn.Module):
        try:
            return adapt(forward_func)
        except UnsupportedModelError:
            return None
    return None


def removal_order(scores: Tensor, mode: str) -> Tensor:
    r"""Feature indices (N, F) in removal order, first removed first.

    Positive: stable sort of ``scores`` by descending value. Negative: the same sort of
    ``-scores`` (Chefer's ``vis = -vis``). Ties are broken by the lower feature index first in
    *both* modes, so a constant map yields the same order (and the same curve) in both.
    """
    if not torch.isfinite(scores).all():
        raise InputValidationError("attributions contain NaN or infinite values; fix the explanation first")
    key = scores if mode == "positive" else -scores
    return torch.sort(key, dim=1, descending=True, stable=True).indices


def targets_and_labels(
    target: TargetType, labels: TargetType, n: int, num_classes: int, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    tgt = format_target(target, n, num_classes, device)
    try:
        lab = format_target(labels, n, num_classes, device)
    except InputValidationError as e:
        raise InputValidationError(f"labels: {e}") from e
    return tgt, lab


def score_logits(logits: Tensor, target: Tensor, labels: Tensor, score: str) -> Tensor:
    """Per-example score (N,) of logits (N, C): top-1 correct vs labels, or target prob/logit."""
    if score == "accuracy":
        return (logits.argmax(-1) == labels).to(logits.dtype)
    if score == "probability":
        return logits.softmax(-1).gather(1, target[:, None])[:, 0]
    return logits.gather(1, target[:, None])[:, 0]


def forward_logits(forward_func: Callable | ModelAdapter, x: Tensor) -> Tensor:
    """Logits (N, C) from any classifier callable (unwraps ``.logits`` of HF outputs)."""
    out = forward_func.model_logits(x) if isinstance(forward_func, ModelAdapter) else forward_func(x)
    if not isinstance(out, Tensor) and hasattr(out, "logits"):
        out = out.logits
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise InputValidationError(
            f"forward_func must return logits of shape (N, num_classes) = ({x.shape[0]}, C), got {shape}; "
            "wrap the model, e.g. lambda x: model(pixel_values=x).logits"
        )
    return out
