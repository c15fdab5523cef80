"""Dataset-level identifiability, streamed over batches and reducible across processes."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.attr.blockwise_identifiability import identifiability_scores
from captum_clsemb.errors import InputValidationError
from captum_clsemb.stream.reduce import StreamingSums
from captum_clsemb.trace import trace


class IdentifiabilityAccumulator:
    r"""Accumulates, batch by batch, the paper's dataset numbers (Table 1, Fig. 2).

    Per image it adds: top-1 correctness (labelled images), the per-block mean score of the
    image tokens and of the class token, the per-block share of image tokens at r = 1, and
    whether any last-block image token has r = 1. Memory is a few vectors of length
    num_blocks, whatever the number of images. Call :meth:`all_reduce` under
    ``torch.distributed`` before :meth:`result` to combine ranks.
    """

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.sums = StreamingSums()
        # every quantity starts at zero, so that a rank whose shard has no usable image still
        # reduces the same quantities as the others
        blocks = torch.zeros(adapter.num_blocks, dtype=torch.float64)
        for name in ("images", "labelled", "correct", "any_last"):
            self.sums.add(name, 0)
        for name in ("image_mean", "rate") + (("cls_mean",) if adapter.has_class_token else ()):
            self.sums.add(name, blocks)

    @property
    def num_images(self) -> int:
        """Images accumulated so far (by all ranks after :meth:`all_reduce`)."""
        return int(self.sums["images"])

    @torch.no_grad()
    def update(self, scores: Tensor, pred: Tensor, labels: Tensor) -> None:
        """``scores`` (N, blocks, T) against the targets; ``labels`` -1 where unknown."""
        p = self.adapter.num_prefix_tokens
        # float64 before any sum, so totals do not depend on how images are batched or sharded
        scores = scores.double()
        img = scores[:, :, p:]
        known = labels >= 0
        self.sums.add("images", scores.shape[0])
        self.sums.add("labelled", known.sum())
        self.sums.add("correct", (pred == labels)[known].sum())
        self.sums.add("image_mean", img.mean(2).sum(0))
        if self.adapter.has_class_token:
            self.sums.add("cls_mean", scores[:, :, self.adapter.class_token_index].sum(0))
        self.sums.add("rate", (img == 1).double().mean(2).sum(0))
        self.sums.add("any_last", (img[:, -1] == 1).any(1).sum())

    def all_reduce(self) -> IdentifiabilityAccumulator:
        self.sums.all_reduce()
        return self

    def result(self) -> dict:
        s, n = self.sums, float(self.sums["images"])
        if n == 0:
            raise InputValidationError("no images were accumulated: every batch was empty")
        labelled = float(s["labelled"])
        curves = {}
        if "cls_mean" in s:
            curves["class token"] = (s["cls_mean"] / n).tolist()
        curves["image tokens"] = (s["image_mean"] / n).tolist()
        rate = (s["rate"] / n * 100).tolist()
        return {
            "num_images": int(n),
            "num_labelled": int(labelled),
            "top1_accuracy": float(s["correct"]) / labelled if labelled else None,
            "identifiability_rate_last_block_percent": rate[-1],
            "identifiability_rate_per_block_percent": rate,
            "images_with_identifiable_token_percent": 100 * float(s["any_last"]) / n,
            "mean_identifiability_per_block": curves,
            "chance_mean_identifiability": 0.5 + 0.5 / self.adapter.num_classes,
            "chance_identifiability_rate_percent": 100 / self.adapter.num_classes,
        }


def score_batch(adapter: ModelAdapter, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One traced forward: (scores (N, blocks, T) against label or prediction, prediction, targets)."""
    tr = trace(adapter, x, record=["resid_post"])
    pred = tr.logits.argmax(-1)
    target = torch.where(labels >= 0, labels, pred)
    scores = torch.stack(
        [identifiability_scores(adapter.project(tr.cache["resid_post", b]), target[:, None])
         for b in range(adapter.num_blocks)], 1,
    )  # fmt: skip
    return scores, pred, target


def dataset_identifiability(
    model: nn.Module | ModelAdapter,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: str | torch.device | None = None,
) -> dict:
    r"""Identifiability numbers for a whole dataset, streamed over ``(images, labels)`` batches.

    Labels of -1 mean unknown (the predicted class is scored). Under ``torch.distributed``
    give each rank its shard (e.g. a DataLoader with :class:`ShardSampler`); the result is
    reduced over ranks and equals a single-process run.
    """
    adapter = adapt(model)
    acc = IdentifiabilityAccumulator(adapter)
    dev = torch.device(device) if device is not None else next(adapter.model.parameters()).device
    for x, labels in batches:
        x, labels = x.to(dev), labels.to(dev)
        scores, pred, _ = score_batch(adapter, x, labels)
        acc.update(scores, pred, labels)
    return acc.all_reduce().result()
