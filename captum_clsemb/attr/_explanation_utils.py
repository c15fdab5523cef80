"""Private helpers shared by the explanation methods (class-embedding gradients and attention maps)."""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
from captum.attr import GradientAttribution, LayerAttribution
from torch import Tensor

from captum_clsemb._utils import (
    TargetType,
    check_additional_forward_args,
    check_batch_size,
    format_inputs,
    format_target,
)
from captum_clsemb.adapters import ModelAdapter
from captum_clsemb.errors import InputValidationError

MultiTargetType = TargetType | Sequence[Sequence[int]]

__all__ = [
    "InputShape",
    "MultiTargetType",
    "batch_slices",
    "captum_attribute",
    "check_batch_size",
    "check_grad_mode",
    "check_interpolate_to",
    "format_targets",
    "require_class_token",
    "select_indices",
    "upsample",
]


# what the classifier head reads, by ``adapter.pooling``


def require_class_token(adapter: ModelAdapter, method: str) -> int:
    """Index of the class token; a clear error, saying what the head reads, for models without one."""
    if not adapter.has_class_token:
        reads = adapter.head_reads
        raise InputValidationError(
            f"{method} explains the class token, but {type(adapter.model).__name__} has no class token: "
            f"its head reads {reads}. Methods that need a class token (ClassEmbeddingGradient, "
            "CheferRelevancy, CheferGradientRollout, AttentionRollout, RawAttention) do not apply; "
            "BlockwiseIdentifiability, ValueVectorProjector and the perturbation metrics do, or use a "
            "class-token model (e.g. timm global_pool='token', a Hugging Face ViT/DeiT classifier)."
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

    Captum's forms of one target per example (int, 1-tuple, list of ints, tensor (N,) or
    (N, 1), list of 1-tuples) give K = 1 and ``multi=False``. Several targets per example
    are given unambiguously by K > 1 columns: a 2-D integer tensor (N, K) or a list of N
    lists/tuples of K ints, K >= 2; they give ``multi=True``.
    """
    rows = None
    if isinstance(target, list) and target and all(isinstance(r, (list, tuple)) for r in target):
        rows = target
    elif isinstance(target, list) and any(isinstance(r, (list, tuple)) for r in target):
        raise InputValidationError(
            "a target list must hold either one int per example or one list of ints per example, not both"
        )
    if rows is not None:
        lengths = {len(r) for r in rows}
        if len(lengths) != 1 or 0 in lengths:
            raise InputValidationError(
                "several targets per image need the same non-zero number K of classes for every image; "
                f"got lengths {[len(r) for r in rows]}"
            )
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for r in rows for v in r):
            raise InputValidationError("target lists must contain int class indices")
        bad = [int(v) for r in rows for v in r if not 0 <= v < num_classes]
        if bad:
            raise InputValidationError(
                f"target {bad[0]} is out of range: the model has {num_classes} classes "
                f"(valid targets 0..{num_classes - 1})"
            )
        if lengths == {1}:  # Captum's list of 1-tuples: one target per example
            return _single(target, num_examples, num_classes, device), False
        target = torch.tensor([[int(v) for v in r] for r in rows], dtype=torch.long)
    if isinstance(target, Tensor) and target.dim() == 2 and target.shape[1] > 1:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise InputValidationError(
                f"target tensor must hold integer class indices, got dtype {target.dtype}; use target.long()"
            )
        if target.shape[0] != num_examples:
            raise InputValidationError(
                f"a 2-D target must be (N, K) with N = {num_examples} examples and K classes per image, "
                f"got shape {tuple(target.shape)}"
            )
        t = target.long()
        if t.min() < 0 or t.max() >= num_classes:
            bad = t[(t < 0) | (t >= num_classes)][0].item()
            raise InputValidationError(
                f"target {bad} is out of range: the model has {num_classes} classes "
                f"(valid targets 0..{num_classes - 1})"
            )
        return t.to(device), True
    return _single(target, num_examples, num_classes, device), False


def _single(target: TargetType, num_examples: int, num_classes: int, device: torch.device) -> Tensor | None:
    single = format_target(target, num_examples, num_classes, device)
    return None if single is None else single[:, None]


class InputShape(tuple):
    """The (H, W) of the inputs, standing for ``interpolate_to="input"`` once resolved.

    Marks that the caller asked for maps shaped like the inputs (N, C, H, W), so that a
    method can refuse output forms that cannot take that shape before computing.
    """


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
            "interpolate_to must be a positive int, a pair (H, W) such as x.shape[-2:], or 'input' "
            f"(maps shaped like the inputs), got {interpolate_to!r}"
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


def batch_slices(num_examples: int, internal_batch_size: int | None) -> list[slice]:
    step = internal_batch_size or max(num_examples, 1)
    return [slice(s, s + step) for s in range(0, num_examples, step)]


def check_grad_mode(method: object) -> None:
    """Gradient methods cannot run under ``torch.inference_mode()``: say so and name the fix."""
    if torch.is_inference_mode_enabled():
        raise InputValidationError(
            f"{type(method).__name__} needs gradients, which torch.inference_mode() disables; call it "
            "under torch.no_grad() or outside any grad context (it enables gradients for its own pass)"
        )


def captum_attribute(attribute: Callable) -> Callable:
    r"""Captum's calling conventions around an ``attribute(self, inputs, ...)`` that works on one tensor.

    - ``inputs`` may be a tensor or a 1-tuple ``(tensor,)``; the result comes back in the
      same form (a 1-tuple in, a 1-tuple out), as Captum's own methods do.
    - ``additional_forward_args`` must be None (the models take images only).
    - ``interpolate_to="input"``: the maps are upsampled bilinearly to the inputs' (H, W)
      and repeated over the C channels, giving (N, C, H, W) like the inputs, the shape
      ``captum.metrics.infidelity`` expects.
    - Gradient methods refuse ``torch.inference_mode()`` with a message (autograd is off
      there); ``torch.no_grad()`` is fine, and inputs made under inference mode are copied.

    Put it below ``@log_usage``: Captum's ``NoiseTunnel`` calls ``attribute.__wrapped__``,
    which then still applies these conventions.
    """
    signature = inspect.signature(attribute)

    @functools.wraps(attribute)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        inputs, is_inputs_tuple = format_inputs(bound.arguments["inputs"])
        bound.arguments["inputs"] = inputs
        check_additional_forward_args(bound.arguments.get("additional_forward_args"))
        if isinstance(self, GradientAttribution):
            check_grad_mode(self)
            if isinstance(inputs, Tensor) and inputs.is_inference():
                # made under inference_mode: autograd cannot save it; a copy is a normal tensor
                bound.arguments["inputs"] = inputs = inputs.clone()
        channels = None
        interpolate_to = bound.arguments.get("interpolate_to")
        if isinstance(interpolate_to, str) and interpolate_to == "input":
            x = self.adapter.check_inputs(inputs)
            bound.arguments["interpolate_to"] = InputShape(x.shape[-2:])
            channels = x.shape[1]
        out = attribute(*bound.args, **bound.kwargs)
        if channels is not None:
            if out.dim() != 4 or out.shape[1] != 1:
                raise InputValidationError(
                    f"interpolate_to='input' needs one map per image, got maps of shape {tuple(out.shape)}"
                )
            out = out.expand(-1, channels, -1, -1).contiguous()
        return (out,) if is_inputs_tuple else out

    return wrapper
