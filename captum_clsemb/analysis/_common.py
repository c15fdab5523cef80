"""Shared plumbing of the dataset-level analyses: batch streams, token groups, accumulators.

Every dataset-level function accepts either one batch (an image tensor plus ``target``) or
an iterable of batches such as a ``torch.utils.data.DataLoader``. Each batch is reduced to
per-block sums and counts at once, so memory does not grow with the number of images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from captum_clsemb._utils import TargetType, format_target
from captum_clsemb.adapters import ModelAdapter
from captum_clsemb.errors import InputValidationError
from captum_clsemb.trace import trace

DataType = Any  # a (N, C, H, W) tensor, or an iterable of (images, labels[, masks]) batches


def iter_batches(
    adapter: ModelAdapter,
    inputs: DataType,
    target: TargetType = None,
    masks: Tensor | None = None,
    internal_batch_size: int | None = None,
) -> Iterator[tuple[Tensor, Tensor | None, Tensor | None]]:
    r"""Yield validated ``(images, target or None, masks or None)`` batches.

    ``inputs`` is either an image tensor (N, C, H, W), with ``target`` and ``masks`` given
    alongside and split into chunks of ``internal_batch_size``, or an iterable of batches.
    A batch is an image tensor, or a tuple/list ``(images, labels)`` or
    ``(images, labels, masks)`` (labels may be None). With an iterable, ``target`` and
    ``masks`` must be None: they come with each batch.
    """
    if isinstance(inputs, tuple) and len(inputs) == 1:
        inputs = inputs[0]
    if isinstance(inputs, Tensor):
        x = adapter.check_inputs(inputs)
        n = x.shape[0]
        tgt = format_target(target, n, adapter.num_classes, x.device)
        if masks is not None:
            masks = torch.as_tensor(masks)
            if masks.shape[0] != n:
                raise InputValidationError(
                    f"masks hold {masks.shape[0]} examples but inputs hold {n}; give one mask per image"
                )
        if internal_batch_size is not None and internal_batch_size < 1:
            raise InputValidationError(f"internal_batch_size must be >= 1, got {internal_batch_size}")
        step = internal_batch_size or max(n, 1)
        for start in range(0, n, step):
            sl = slice(start, start + step)
            yield x[sl], None if tgt is None else tgt[sl], None if masks is None else masks[sl]
        return
    if target is not None or masks is not None:
        raise InputValidationError(
            "target and masks must be None when inputs is an iterable of batches: "
            "yield (images, labels) or (images, labels, masks) from the iterable instead"
        )
    if not isinstance(inputs, Iterable):
        raise InputValidationError(
            f"inputs must be an image tensor (N, C, H, W) or an iterable of batches (e.g. a DataLoader), "
            f"got {type(inputs).__name__}"
        )
    for batch in inputs:
        if isinstance(batch, Tensor):
            images, labels, batch_masks = batch, None, None
        elif isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
            images = batch[0]
            labels = batch[1] if len(batch) > 1 else None
            batch_masks = batch[2] if len(batch) > 2 else None
        else:
            raise InputValidationError(
                "each batch must be an image tensor or a tuple (images, labels[, masks]); "
                f"got {type(batch).__name__}"
                + (f" of length {len(batch)}" if hasattr(batch, "__len__") else "")
            )
        yield from iter_batches(adapter, images, labels, batch_masks, internal_batch_size)


def target_or_prediction(adapter: ModelAdapter, x: Tensor, target: Tensor | None) -> Tensor:
    """The given target, or the model's predicted class (one extra plain traced pass)."""
    if target is not None:
        return target
    return trace(adapter, x).logits.argmax(-1)


def token_groups(adapter: ModelAdapter) -> dict[str, slice | int]:
    """Positions of the token groups in a traced sequence: ``cls`` (if any) and ``image``."""
    groups: dict[str, slice | int] = {}
    if adapter.has_class_token:
        groups["cls"] = adapter.class_token_index
    groups["image"] = slice(adapter.num_prefix_tokens, None)
    return groups


class RateAccumulator:
    r"""Per-block hit sums and counts, kept in float64, turned into percentages at the end.

    ``add(name, hits, counts)`` adds (blocks,) tensors; :meth:`percent` returns
    ``100 * hits / counts`` (NaN where a count is 0).
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.hits: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}

    def add(self, name: str, hits: Tensor, counts: Tensor | float) -> None:
        hits = hits.detach().to("cpu", torch.float64)
        counts = torch.as_tensor(counts, dtype=torch.float64).detach().cpu().expand_as(hits)
        if name not in self.hits:
            self.hits[name] = torch.zeros(self.num_blocks, dtype=torch.float64)
            self.counts[name] = torch.zeros(self.num_blocks, dtype=torch.float64)
        self.hits[name] += hits
        self.counts[name] += counts

    def add_mask(self, name: str, hits: Tensor, select: Tensor | None = None) -> None:
        r"""Add a boolean/float (N, blocks, T) hit tensor, counting tokens where ``select`` (N, T) holds."""
        hits = hits.to(torch.float64)
        if select is None:
            self.add(
                name, hits.sum(dim=(0, 2)), torch.full((hits.shape[1],), float(hits.shape[0] * hits.shape[2]))
            )
            return
        sel = select.to(torch.float64)[:, None, :]
        self.add(name, (hits * sel).sum(dim=(0, 2)), sel.sum(dim=(0, 2)).expand(hits.shape[1]))

    def percent(self, name: str) -> Tensor:
        if name not in self.hits:
            return torch.full((self.num_blocks,), float("nan"), dtype=torch.float64)
        counts = self.counts[name]
        return torch.where(counts > 0, 100.0 * self.hits[name] / counts.clamp_min(1), float("nan"))

    def mean(self, name: str) -> Tensor:
        """``hits / counts`` without the factor 100 (for averaged scores)."""
        return self.percent(name) / 100.0

    def count(self, name: str) -> Tensor:
        return self.counts.get(name, torch.zeros(self.num_blocks, dtype=torch.float64)).clone()


def check_layer(layer: str) -> str:
    if layer not in ("mlp", "attn"):
        raise InputValidationError(f"layer must be 'mlp' or 'attn', got {layer!r}")
    return layer


def check_k(k: int, limit: int, what: str) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limit:
        raise InputValidationError(f"{what} must be an int between 1 and {limit}, got {k!r}")
    return k
