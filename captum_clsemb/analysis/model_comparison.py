r"""Several models in one study (paper Fig. 2 and Table 1): per-image identifiability, curves
over normalised depth, a Table 1-style summary and trained-versus-random-init tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from captum_clsemb._utils import TargetType, format_target
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.attr.blockwise_identifiability import identifiability_scores
from captum_clsemb.errors import InputValidationError
from captum_clsemb.stats import ConfidenceInterval, TestResult, bootstrap_ci, wilcoxon_signed_rank
from captum_clsemb.trace import trace

GROUPS = ("image", "cls")
UNITS = ("images", "tokens")


@dataclass
class IdentifiabilityRecord:
    r"""Per-image identifiability of one model on a set of images (what the tests need).

    Attributes:
        name: the model's name in tables and plots.
        num_classes: number of classes (chance levels).
        image_mean: (N, B) per image and block, the mean score of the image tokens.
        image_rate: (N, B) per image and block, the share (%) of image tokens with r = 1.
        cls_score: (N, B) the class token's score, None for models without one.
        any_identifiable: (N,) bool, some last-block image token has r = 1.
        correct: (N,) bool, top-1 prediction equals the label (False where unlabelled).
        labelled: (N,) bool, the image has a label (else the prediction was scored).
        token_scores: (N, B, P) image-token scores, kept only on request (for the authors'
            test over pooled tokens).
        ids: optional image identifiers (e.g. file paths), to check that two records hold
            the same images in the same order.
    """

    name: str
    num_classes: int
    image_mean: np.ndarray
    image_rate: np.ndarray
    cls_score: np.ndarray | None
    any_identifiable: np.ndarray
    correct: np.ndarray
    labelled: np.ndarray
    token_scores: np.ndarray | None = None
    ids: list[str] | None = None

    @property
    def num_images(self) -> int:
        return int(self.image_mean.shape[0])

    @property
    def num_blocks(self) -> int:
        return int(self.image_mean.shape[1])

    def per_image(self, group: str = "image", stat: str = "mean") -> np.ndarray:
        """(N, B) per-image values: ``group`` ``"image"`` or ``"cls"``, ``stat`` ``"mean"`` or ``"rate"``."""
        if group not in GROUPS:
            raise InputValidationError(f"group must be one of {GROUPS}, got {group!r}")
        if stat not in ("mean", "rate"):
            raise InputValidationError(f"stat must be 'mean' or 'rate', got {stat!r}")
        if group == "cls":
            if self.cls_score is None:
                raise InputValidationError(f"model {self.name!r} has no class token; use group='image'")
            return self.cls_score if stat == "mean" else 100.0 * (self.cls_score == 1)
        return self.image_mean if stat == "mean" else self.image_rate

    def table_row(
        self, confidence_level: float = 0.95, n_resamples: int = 9999, seed: int | None = 0
    ) -> dict:
        r"""The Table 1 numbers with percentile bootstrap intervals over images.

        Returns:
            ``{"model", "num_blocks", "num_images", "num_labelled",
            "identifiability_rate_last_block_percent", "images_with_identifiable_token_percent",
            "top1_accuracy_percent"}``, each number a :class:`ConfidenceInterval` (accuracy
            None without labelled images).
        """
        kw = dict(confidence_level=confidence_level, n_resamples=n_resamples, seed=seed)
        lab = self.labelled
        return {
            "model": self.name,
            "num_blocks": self.num_blocks,
            "num_images": self.num_images,
            "num_labelled": int(lab.sum()),
            "identifiability_rate_last_block_percent": bootstrap_ci(self.image_rate[:, -1], **kw),
            "images_with_identifiable_token_percent": bootstrap_ci(100.0 * self.any_identifiable, **kw),
            "top1_accuracy_percent": bootstrap_ci(100.0 * self.correct[lab], **kw) if lab.any() else None,
        }


def _iter(
    adapter: ModelAdapter, inputs: Any, target: TargetType, internal_batch_size: int | None
) -> Iterable[tuple[Tensor, Tensor | None]]:
    """(images, labels with -1 for unknown, or None) batches from a tensor or an iterable."""
    if isinstance(inputs, Tensor):
        x = adapter.check_inputs(inputs)
        tgt = format_target(target, x.shape[0], adapter.num_classes, x.device)
        step = internal_batch_size or max(x.shape[0], 1)
        for s in range(0, x.shape[0], step):
            yield x[s : s + step], None if tgt is None else tgt[s : s + step]
        return
    if target is not None:
        raise InputValidationError(
            "target must be None when inputs is an iterable of (images, labels) batches"
        )
    for batch in inputs:
        if isinstance(batch, Tensor):
            yield adapter.check_inputs(batch), None
            continue
        if not isinstance(batch, (tuple, list)) or not batch:
            raise InputValidationError("each batch must be an image tensor or a tuple (images, labels, ...)")
        labels = batch[1] if len(batch) > 1 else None
        yield adapter.check_inputs(batch[0]), None if labels is None else torch.as_tensor(labels)


def per_image_identifiability(
    forward_func: nn.Module | ModelAdapter,
    inputs: Any,
    target: TargetType = None,
    name: str | None = None,
    keep_token_scores: bool = False,
    ids: Sequence[str] | None = None,
    internal_batch_size: int | None = None,
) -> IdentifiabilityRecord:
    r"""Per-image identifiability numbers of one model, streamed over batches (one traced pass each).

    The scores are those of :class:`~captum_clsemb.attr.BlockwiseIdentifiability` (the
    residual stream after each block through the model's final norm and head), against the
    label, or the prediction where the label is unknown (None, or -1 in a batch).

    Args:
        forward_func: a supported ViT or its adapter.
        inputs: an image tensor (N, C, H, W) with ``target``, or an iterable of
            ``(images, labels)`` batches (labels -1 or None: unknown).
        target: labels for tensor inputs.
        name: the model's name. Default: the adapter's description.
        keep_token_scores: also keep every image token's score (N, B, P), needed for the
            authors' test over pooled tokens (``unit="tokens"`` in :func:`compare_models`).
        ids: image identifiers (e.g. paths), stored to check pairing across models.
        internal_batch_size: chunk size for tensor inputs.
    Returns:
        an :class:`IdentifiabilityRecord`.
    """
    adapter = adapt(forward_func)
    p = adapter.num_prefix_tokens
    parts: dict[str, list[Tensor]] = {
        k: [] for k in ("mean", "rate", "cls", "any", "correct", "labelled", "tok")
    }
    for x, labels in _iter(adapter, inputs, target, internal_batch_size):
        tr = trace(adapter, x, record=["resid_post"])
        pred = tr.logits.argmax(-1)
        if labels is None:
            labels = torch.full_like(pred, -1)
        labels = labels.to(pred.device).long()
        if labels.shape != pred.shape:
            raise InputValidationError(f"a batch holds {pred.shape[0]} images but {labels.numel()} labels")
        if (labels >= adapter.num_classes).any() or (labels < -1).any():
            raise InputValidationError(
                f"labels must be class indices in [0, {adapter.num_classes - 1}] or -1 for unknown"
            )
        known = labels >= 0
        tgt = torch.where(known, labels, pred)
        scores = torch.stack(
            [identifiability_scores(adapter.project(tr.cache["resid_post", b]), tgt[:, None])
             for b in range(adapter.num_blocks)], 1,
        ).double()  # fmt: skip
        img = scores[:, :, p:]
        parts["mean"].append(img.mean(2).cpu())
        parts["rate"].append(100.0 * (img == 1).double().mean(2).cpu())
        if adapter.has_class_token:
            parts["cls"].append(scores[:, :, adapter.class_token_index].cpu())
        parts["any"].append((img[:, -1] == 1).any(1).cpu())
        parts["correct"].append(((pred == labels) & known).cpu())
        parts["labelled"].append(known.cpu())
        if keep_token_scores:
            parts["tok"].append(img.float().cpu())
    if not parts["mean"]:
        raise InputValidationError("inputs hold no images")

    def cat(key: str) -> np.ndarray:
        return torch.cat(parts[key]).numpy()

    n = sum(t.shape[0] for t in parts["mean"])
    if ids is not None and len(ids) != n:
        raise InputValidationError(f"got {len(ids)} ids for {n} images")
    return IdentifiabilityRecord(
        name=name if name is not None else repr(adapter),
        num_classes=adapter.num_classes,
        image_mean=cat("mean"),
        image_rate=cat("rate"),
        cls_score=cat("cls") if parts["cls"] else None,
        any_identifiable=cat("any"),
        correct=cat("correct"),
        labelled=cat("labelled"),
        token_scores=cat("tok") if keep_token_scores else None,
        ids=None if ids is None else [str(i) for i in ids],
    )


def depth_weights(num_blocks: int, num_points: int) -> np.ndarray:
    r"""Weights (num_points, num_blocks) that resample B blocks onto a common depth grid.

    Block :math:`i` covers the depth interval :math:`[i/B, (i+1)/B]` and grid point
    :math:`j` the interval :math:`[j/T, (j+1)/T]`; each grid point averages the blocks
    weighted by the overlap of their intervals (an area-weighted resampling; rows sum to 1).
    For :math:`B = 2T` every point is the plain mean of a pair of blocks, the paper's
    averaging of ViT-L's 24 blocks onto 12; for :math:`B = T` it is the identity. Overlaps
    are computed in integer units of :math:`1/(BT)`, so these cases are exact.
    """
    for v, what in ((num_blocks, "num_blocks"), (num_points, "num_points")):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise InputValidationError(f"{what} must be a positive int, got {v!r}")
    b, t = int(num_blocks), int(num_points)
    i = np.arange(b)[None, :]
    j = np.arange(t)[:, None]
    overlap = np.clip(np.minimum((i + 1) * t, (j + 1) * b) - np.maximum(i * t, j * b), 0, None)
    return overlap / b  # each grid interval has length b units


def resample_depth(values: Any, num_points: int) -> np.ndarray:
    r"""Per-block values (..., B) resampled onto ``num_points`` depths (..., T) (:func:`depth_weights`).

    Linear in the values, so resampling per-image curves and then averaging over images
    equals resampling the mean curve.
    """
    v = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values, dtype=np.float64)
    if v.ndim < 1:
        raise InputValidationError("values must have a block axis (the last)")
    return v @ depth_weights(v.shape[-1], num_points).T


def normalised_depth(num_points: int) -> np.ndarray:
    """Depth of each grid point as the end of its interval: 1/T, 2/T, ..., 1."""
    return np.arange(1, num_points + 1) / num_points


@dataclass
class ModelComparison:
    r"""Fig. 2 curves over normalised depth, a Table 1-style table and trained-vs-random tests.

    Attributes:
        depth: (T,) normalised depth of the grid points (1/T, ..., 1).
        num_points: T.
        curves: ``{model: {"mean": {group: (T,)}, "rate": {group: (T,)}}}`` on the grid,
            groups ``"image"`` and (class-token models) ``"cls"``; the same layout as
            :func:`~captum_clsemb.analysis.identifiability_summary`.
        curve_ci: the same layout with :class:`~captum_clsemb.stats.ConfidenceInterval`
            (percentile bootstrap over images).
        baseline_curves, baseline_ci: the same for the random-init baselines, keyed by the
            trained model's name.
        table: Table 1 rows (:meth:`IdentifiabilityRecord.table_row`), with the baseline's
            last-block rate under ``"random_init_identifiability_rate_last_block_percent"``.
        tests: ``{model: {group: TestResult}}``, one-sided Wilcoxon signed-rank tests of the
            trained model against its baseline at every grid point (BH-adjusted across the
            grid), on the mean identifiability.
        block_tests: the same on the model's own blocks.
        settings: unit of the tests, alternative, seed, confidence level, resamples.
    """

    depth: np.ndarray
    num_points: int
    curves: dict[str, dict[str, dict[str, np.ndarray]]]
    curve_ci: dict[str, dict[str, dict[str, ConfidenceInterval]]]
    baseline_curves: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    baseline_ci: dict[str, dict[str, dict[str, ConfidenceInterval]]] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)
    tests: dict[str, dict[str, TestResult]] = field(default_factory=dict)
    block_tests: dict[str, dict[str, TestResult]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays as lists, intervals and tests through their ``to_dict()``."""

        def plain(v: Any) -> Any:
            if isinstance(v, (ConfidenceInterval, TestResult)):
                return v.to_dict()
            if isinstance(v, np.ndarray):
                return plain(v.tolist())
            if isinstance(v, dict):
                return {str(k): plain(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, (np.floating, float)):
                return float(v) if np.isfinite(v) else None
            if isinstance(v, np.integer):
                return int(v)
            return v

        return plain(
            {
                "normalised_depth": self.depth,
                "num_points": self.num_points,
                "curves": self.curves,
                "curve_ci": self.curve_ci,
                "random_init_curves": self.baseline_curves,
                "random_init_ci": self.baseline_ci,
                "table": self.table,
                "tests_trained_vs_random_init": self.tests,
                "tests_trained_vs_random_init_per_block": self.block_tests,
                "settings": self.settings,
            }
        )


def _as_records(records: Mapping[str, IdentifiabilityRecord] | Sequence[IdentifiabilityRecord]) -> dict:
    if isinstance(records, Mapping):
        out = dict(records)
    else:
        out = {r.name: r for r in records}
        if len(out) != len(records):
            raise InputValidationError("model names must be unique; give each record its own name")
    for key, rec in out.items():
        if not isinstance(rec, IdentifiabilityRecord):
            raise InputValidationError(
                f"{key!r}: expected an IdentifiabilityRecord (from per_image_identifiability), got {type(rec).__name__}"
            )
    return out


def _curves(rec: IdentifiabilityRecord, t: int, ci_kw: dict) -> tuple[dict, dict]:
    groups = [g for g in GROUPS if g == "image" or rec.cls_score is not None]
    curves: dict[str, dict[str, np.ndarray]] = {"mean": {}, "rate": {}}
    cis: dict[str, dict[str, ConfidenceInterval]] = {"mean": {}, "rate": {}}
    for stat in ("mean", "rate"):
        for g in groups:
            per = resample_depth(rec.per_image(g, stat), t)  # (N, T)
            curves[stat][g] = per.mean(0)
            cis[stat][g] = bootstrap_ci(per, **ci_kw)
    return curves, cis


def _paired_values(rec: IdentifiabilityRecord, group: str, unit: str, t: int | None) -> np.ndarray:
    """(units, B or T) values for the paired test: per image, or per token (pooled)."""
    if unit == "images":
        v = rec.per_image(group, "mean")
    elif group == "cls":
        v = rec.cls_score  # one class token per image: tokens and images coincide
    else:
        if rec.token_scores is None:
            raise InputValidationError(
                f"unit='tokens' needs every token's score: build {rec.name!r} with "
                "per_image_identifiability(..., keep_token_scores=True)"
            )
        v = rec.token_scores.transpose(0, 2, 1).reshape(-1, rec.num_blocks).astype(np.float64)
    return v if t is None else resample_depth(v, t)


def compare_models(
    records: Mapping[str, IdentifiabilityRecord] | Sequence[IdentifiabilityRecord],
    baselines: Mapping[str, IdentifiabilityRecord] | None = None,
    num_points: int | None = None,
    unit: str = "images",
    alternative: str = "greater",
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
    seed: int | None = 0,
) -> ModelComparison:
    r"""Several models on one normalised-depth axis, with Table 1 and trained-vs-random tests.

    Every model's per-image curves are resampled onto a common grid of ``num_points``
    depths (:func:`depth_weights`: the paper's pair-averaging of ViT-L's 24 blocks onto 12
    when B = 2T), averaged over images, with percentile bootstrap intervals over images.
    For each model with a baseline (its random-init copy on the **same images in the same
    order**), the mean identifiability of the image tokens and of the class token is
    compared at every grid point and every block with the one-sided Wilcoxon signed-rank
    test (the paper's Fig. 2 stars), Benjamini-Hochberg adjusted across the points.

    ``unit`` is the unit of pairing: ``"images"`` (default; each image's mean over its
    tokens, independent units) or ``"tokens"`` (the authors: every image token paired with
    the same token of the random model, pooled over images; tokens of one image are not
    independent, so p-values are smaller than the images warrant).

    Args:
        records: ``{name: record}`` or a list of records (names from ``record.name``), from
            :func:`per_image_identifiability`.
        baselines: ``{name: record}`` of the random-init copies (e.g. of
            :func:`~captum_clsemb.analysis.random_init_copy`), keyed by the trained model's name.
        num_points: grid size T. Default: the smallest number of blocks among the models.
        unit: ``"images"`` or ``"tokens"``.
        alternative: of the tests (trained versus random). Default: ``"greater"``.
        confidence_level, n_resamples, seed: of the bootstrap intervals.
    Returns:
        a :class:`ModelComparison`.

    Examples::

        >>> rec = per_image_identifiability(model, loader, name="ViT-B/32")
        >>> rnd = per_image_identifiability(random_init_copy(model), loader, name="random")
        >>> cmp = compare_models({"ViT-B/32": rec}, baselines={"ViT-B/32": rnd})
        >>> cmp.tests["ViT-B/32"]["image"].p_value_adjusted, cmp.table[0]
    """
    recs = _as_records(records)
    if not recs:
        raise InputValidationError("records are empty: give at least one model")
    base = _as_records(baselines) if baselines is not None else {}
    unknown = sorted(set(base) - set(recs))
    if unknown:
        raise InputValidationError(f"baselines for unknown models {unknown}; models: {sorted(recs)}")
    if unit not in UNITS:
        raise InputValidationError(f"unit must be one of {UNITS}, got {unit!r}")
    t = num_points if num_points is not None else min(r.num_blocks for r in recs.values())
    depth_weights(1, t)  # validates num_points
    ci_kw = dict(confidence_level=confidence_level, n_resamples=n_resamples, seed=seed)
    out = ModelComparison(
        depth=normalised_depth(t),
        num_points=t,
        curves={},
        curve_ci={},
        settings={
            "test": "wilcoxon_signed_rank",
            "unit": unit,
            "alternative": alternative,
            "correction": "benjamini-hochberg",
            "confidence_level": confidence_level,
            "bootstrap": "percentile, over images",
            "n_resamples": n_resamples,
            "seed": seed,
            "depth_resampling": "area-weighted average of blocks over normalised depth",
        },
    )
    for name, rec in recs.items():
        out.curves[name], out.curve_ci[name] = _curves(rec, t, ci_kw)
        row = rec.table_row(confidence_level, n_resamples, seed)
        if name in base:
            rnd = base[name]
            if rnd.num_images != rec.num_images or rnd.num_blocks != rec.num_blocks:
                raise InputValidationError(
                    f"baseline of {name!r} must hold the same images and blocks: {rnd.num_images} images x "
                    f"{rnd.num_blocks} blocks vs {rec.num_images} x {rec.num_blocks}"
                )
            if rec.ids is not None and rnd.ids is not None and rec.ids != rnd.ids:
                raise InputValidationError(
                    f"baseline of {name!r} holds other images (ids differ), or another order"
                )
            out.baseline_curves[name], out.baseline_ci[name] = _curves(rnd, t, ci_kw)
            row["random_init_identifiability_rate_last_block_percent"] = bootstrap_ci(
                rnd.image_rate[:, -1], **ci_kw
            )
            out.tests[name], out.block_tests[name] = {}, {}
            for g in GROUPS:
                if g == "cls" and (rec.cls_score is None or rnd.cls_score is None):
                    continue
                for target, grid in ((out.tests, t), (out.block_tests, None)):
                    res = wilcoxon_signed_rank(
                        _paired_values(rec, g, unit, grid),
                        _paired_values(rnd, g, unit, grid),
                        alternative=alternative,
                    )
                    res.details["unit"] = unit if g == "image" else "images"
                    res.details["quantity"] = (
                        f"mean identifiability, {'class token' if g == 'cls' else 'image tokens'}"
                    )
                    target[name][g] = res
        out.table.append(row)
    return out
