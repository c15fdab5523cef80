"""Private helpers shared by the explanation methods (class-embedding gradients and attention maps)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from captum.attr import LayerAttribution
from torch import Tensor

from captum_clsemb._utils import TargetType, format_target
from captum_clsemb.adapters import ModelAdapter
from captum_clsemb.errors import InputValidationError

MultiTargetType = TargetType | Sequence[Sequence[int]]


def require_class_token(adapter: ModelAdapter, method: str) -> int:
    """Index of the class token; a clear error for models without one (GAP)."""
    if not adapter.has_class_token:
        raise InputValidationError(
            f"{method} explains the class token, but {type(adapter.model).__name__} has no class token "
            "(it pools by global averaging). Use a class-token ViT (timm global_pool='token' with "
            "class_token=True, or a Hugging Face ViT/DeiT classifier)."
        )
    return adapter.class_token_index


def select_indices(selection: int | Iterable[int] | None, total: int, name: str) -> list[int]:
    """Normalise a block/head selection (None = all, an int, or ints; negatives count from the end)."""
    if selection is None:
        return list(range(total))
    if isinstance(selection, Tensor):
        selection = selection.tolist()
    items = [selection] if isinstance(selection, int) else list(selection)
    if not items:
        raise InputValidationError(f"{name} selects nothing; pass None for all {total} or a list of indices")
    out = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise InputValidationError(f"{name} must hold int indices, got {i!r}")
        if not -total <= i < total:
            raise InputValidationError(
                f"{name} index {i} is out of range: the model has {total} (0..{total - 1})"
            )
        out.append(i % total)
    if len(set(out)) != len(out):
        raise InputValidationError(f"{name} contains a repeated index: {items}")
    return out


def format_targets(
    target: MultiTargetType, num_examples: int, num_classes: int, device: torch.device
) -> tuple[Tensor | None, bool]:
    r"""Targets as a LongTensor (N, K), or None (use the prediction), and whether K is an output dim.

    One target per example (Captum forms: int, list of ints, 0-d/1-D tensor) gives K = 1 and
    ``multi=False``; a 2-D integer tensor (N, K) or a list of N lists of K ints gives ``multi=True``.
    """
    nested = isinstance(target, (list, tuple)) and len(target) > 0 and not isinstance(target[0], int)
    if nested:
        rows = list(target)
        if not all(isinstance(r, (list, tuple)) for r in rows):
            raise InputValidationError(
                "a target list must hold either one int per example or one list of ints per example"
            )
        lengths = {len(r) for r in rows}
        if len(lengths) != 1 or 0 in lengths:
            raise InputValidationError(
                "several targets per image need the same non-zero number K of classes for every image; "
                f"got lengths {[len(r) for r in rows]}"
            )
        if not all(isinstance(v, int) and not isinstance(v, bool) for r in rows for v in r):
            raise InputValidationError("target lists must contain int class indices")
        target = torch.tensor([list(r) for r in rows], dtype=torch.long)
    if isinstance(target, Tensor) and target.dim() == 2:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise InputValidationError(
                f"target tensor must hold integer class indices, got dtype {target.dtype}; use target.long()"
            )
        if target.shape[0] != num_examples or target.shape[1] == 0:
            raise InputValidationError(
                f"a 2-D target must be (N, K) with N = {num_examples} examples and K >= 1 classes per image, "
                f"got shape {tuple(target.shape)}"
            )
        t = target.long()
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            bad = t[(t < 0) | (t >= num_classes)][0].item()
            raise InputValidationError(
                f"target {bad} is out of range: the model has {num_classes} classes "
                f"(valid targets 0..{num_classes - 1})"
            )
        return t.to(device), True
    single = format_target(target, num_examples, num_classes, device)
    return (None if single is None else single[:, None]), False


def check_interpolate_to(interpolate_to: int | Sequence[int] | None) -> tuple[int, int] | None:
    """None, or (H, W) from a positive int (square) or a pair such as ``x.shape[-2:]``."""
    if interpolate_to is None:
        return None
    if isinstance(interpolate_to, int) and not isinstance(interpolate_to, bool):
        interpolate_to = (interpolate_to, interpolate_to)
    if isinstance(interpolate_to, torch.Size):
        interpolate_to = tuple(interpolate_to)
    if (
        not isinstance(interpolate_to, (tuple, list))
        or len(interpolate_to) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in interpolate_to)
    ):
        raise InputValidationError(
            f"interpolate_to must be a positive int or a pair (H, W), e.g. x.shape[-2:], got {interpolate_to!r}"
        )
    return int(interpolate_to[0]), int(interpolate_to[1])


def upsample(maps: Tensor, size: tuple[int, int] | None) -> Tensor:
    """Bilinear upsampling of (N, ..., h, w) maps with Captum's ``LayerAttribution.interpolate``."""
    if size is None:
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(lead[0], -1, *maps.shape[-2:])
    out = LayerAttribution.interpolate(flat, size, "bilinear")
    return out.reshape(*lead, *size)


def check_batch_size(internal_batch_size: int | None) -> None:
    if internal_batch_size is not None and (
        isinstance(internal_batch_size, bool)
        or not isinstance(internal_batch_size, int)
        or internal_batch_size < 1
    ):
        raise InputValidationError(
            f"internal_batch_size must be a positive int or None, got {internal_batch_size!r}"
        )


def batch_slices(num_examples: int, internal_batch_size: int | None) -> list[slice]:
    step = internal_batch_size or max(num_examples, 1)
    return [slice(s, s + step) for s in range(0, num_examples, step)]
