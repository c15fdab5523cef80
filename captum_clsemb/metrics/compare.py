r"""Compare explanation methods by perturbation tests: tables (Markdown, CSV) and curve plots."""

from __future__ import annotations

import csv
import importlib
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from captum_clsemb._utils import check_finite
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.errors import InputValidationError, UnsupportedModelError
from captum_clsemb.metrics._common import check_options, score_logits
from captum_clsemb.metrics.auc import DEFAULT_FRACTIONS, MODES, authors_auc, check_fractions, trapezoid_auc
from captum_clsemb.metrics.pixel_removal import pixel_removal_auc
from captum_clsemb.metrics.rankings import LinearProbeRanking, RandomRanking
from captum_clsemb.metrics.token_removal import token_removal_auc

# name in the results -> (module, class); imported lazily, skipped when not available
DEFAULT_METHOD_CLASSES: dict[str, tuple[str, str]] = {
    "ClassEmbeddingGradient": ("captum_clsemb.attr.class_embedding_gradient", "ClassEmbeddingGradient"),
    "CheferRelevancy": ("captum_clsemb.attr.chefer_relevancy", "CheferRelevancy"),
    "CheferGradientRollout": ("captum_clsemb.attr.chefer_gradient_rollout", "CheferGradientRollout"),
    "AttentionRollout": ("captum_clsemb.attr.attention_rollout", "AttentionRollout"),
    "RawAttention": ("captum_clsemb.attr.raw_attention", "RawAttention"),
}

# the default methods that explain the class token: left out for models without one
CLASS_TOKEN_METHODS: tuple[str, ...] = tuple(DEFAULT_METHOD_CLASSES)

Method = Any  # a callable (inputs, target) -> attributions, an object with .attribute, or a class


class DefaultMethods(dict):
    r"""``{name: method}`` as returned by :func:`default_methods`, with ``notes``.

    ``notes`` lists, one sentence each, the default methods that were left out and why
    (no class token, not available, no probe data) and caveats of the ones kept;
    :func:`compare_explanations` copies them into :attr:`ComparisonResults.notes`.
    """

    def __init__(self, *args: Any, notes: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notes = list(notes)


def _head_reads(adapter: ModelAdapter) -> str:
    from captum_clsemb.adapters.base import HEAD_READS

    return HEAD_READS.get(adapter.pooling, f"its tokens pooled as {adapter.pooling!r}")


def default_methods(
    model: nn.Module | ModelAdapter,
    probe_data: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
    probe_batch_size: int | None = None,
) -> DefaultMethods:
    r"""The default explanation methods, built for ``model``.

    ClassEmbeddingGradient, CheferRelevancy, CheferGradientRollout, AttentionRollout and
    RawAttention (the class-token methods: left out for models without a class token, e.g.
    global-average-pooling ViTs and SigLIP; each also left out when its module is not
    available or it does not support the model, e.g. LRP on rotary embeddings), a
    linear-probe ranking (:class:`LinearProbeRanking`, fitted on ``probe_data``; left out
    when ``probe_data`` is None) and a seeded per-image random ranking. Whatever is left
    out is said in a warning and in the returned ``notes``, which
    :func:`compare_explanations` shows with its results. On a model with a class token that
    its head does not read (e.g. EVA-02 and BEiT mean pooling), the class-token methods
    run, with a note that they explain the class token, not the prediction.

    Args:
        model: a supported ViT or its adapter.
        probe_data: ``(images, labels)`` to fit the probes on, disjoint from the evaluated
            images (the authors: 10 per class).
        seed: seed of the random ranking. Default: 0.
        probe_batch_size: images per forward when fitting the probes.
    Returns:
        :class:`DefaultMethods`: ``{name: method}`` in the order above, with ``notes``.
    """
    adapter = adapt(model)
    methods = DefaultMethods()
    notes: list[str] = []
    model_name = type(adapter.model).__name__
    skip: tuple[str, ...] = ()
    if not adapter.has_class_token:
        skip = CLASS_TOKEN_METHODS
        notes.append(
            f"{', '.join(skip)} left out: they explain the class token, and {model_name} has none "
            f"(its head reads {_head_reads(adapter)})."
        )
    missing, unsupported = [], []
    for name, (module_name, class_name) in DEFAULT_METHOD_CLASSES.items():
        if name in skip:
            continue
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            missing.append(name)
            continue
        try:
            methods[name] = cls(adapter)
        except (InputValidationError, UnsupportedModelError) as e:  # e.g. no LRP rule for a part
            unsupported.append(f"{name}: {e}")
    kept = [name for name in CLASS_TOKEN_METHODS if name in methods]
    if kept and not adapter.reads_class_token:
        notes.append(
            f"The head of {model_name} reads {_head_reads(adapter)}, not the class token: "
            f"{', '.join(kept)} explain the class token's own state (a token of the model), "
            "not what the prediction is computed from."
        )
    if missing:
        notes.append(f"explanation methods not available, left out: {missing}")
    if unsupported:
        notes.append(f"explanation methods that do not support this model, left out: {unsupported}")
    if probe_data is not None:
        methods["LinearProbe"] = LinearProbeRanking(adapter).fit(*probe_data, batch_size=probe_batch_size)
    else:
        notes.append("no probe_data given: the linear-probe ranking is left out")
    methods["Random"] = RandomRanking(adapter, seed=seed)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    methods.notes = notes
    return methods


@dataclass
class ComparisonResults:
    r"""Per-example perturbation curves of several methods, with summaries.

    Attributes:
        methods: method names, in input order.
        fractions: removal fractions (S,).
        curves: ``curves[method][mode]`` is a (N, S) tensor of per-example scores,
            ``mode`` in ``("negative", "positive")``.
        clean_score: mean score on the unperturbed images.
        seconds: attribution time per method (total over the images), in seconds.
        num_images, score, protocol, explain_target: the run's settings.
        notes: default methods left out and why, and caveats (see :func:`default_methods`);
            shown by :func:`to_markdown`.
    """

    methods: list[str]
    fractions: Tensor
    curves: dict[str, dict[str, Tensor]]
    clean_score: float
    seconds: dict[str, float]
    num_images: int
    score: str
    protocol: str
    explain_target: str
    notes: list[str] = field(default_factory=list)

    def mean_curve(self, method: str, mode: str) -> Tensor:
        """Mean curve (S,) over images."""
        return self.curves[method][mode].mean(0)

    def auc(self, method: str, mode: str, convention: str = "trapezoid") -> float:
        """Mean AUC over images: ``"trapezoid"`` (×100) or ``"authors"`` (normalised sum of the mean curve)."""
        c = self.curves[method][mode]
        if convention == "trapezoid":
            return float(trapezoid_auc(c, self.fractions).mean())
        if convention == "authors":
            return float(authors_auc(c.mean(0)))
        raise InputValidationError(f"convention must be 'trapezoid' or 'authors', got {convention!r}")

    def auc_sem(self, method: str, mode: str) -> float:
        """Standard error of the mean trapezoid AUC over images."""
        a = trapezoid_auc(self.curves[method][mode], self.fractions)
        return float(a.std() / a.numel() ** 0.5) if a.numel() > 1 else float("nan")

    def rows(self) -> list[dict[str, Any]]:
        """One summary row per (method, mode)."""
        out = []
        for m in self.methods:
            for mode in MODES:
                curve = self.mean_curve(m, mode)
                row = {
                    "method": m,
                    "mode": mode,
                    "auc_trapezoid": self.auc(m, mode),
                    "auc_sem": self.auc_sem(m, mode),
                    "auc_authors": self.auc(m, mode, "authors"),
                    "ms_per_image": 1000 * self.seconds[m] / max(self.num_images, 1),
                }
                row.update({f"score@{f:.3g}": float(v) for f, v in zip(self.fractions.tolist(), curve)})
                out.append(row)
        return out


def _explain(method: Any, x: Tensor, target: Tensor) -> Tensor:
    if hasattr(method, "attribute"):
        out = method.attribute(x, target=target)
    elif callable(method):
        out = method(x, target)
    else:
        raise InputValidationError(
            f"a method must be callable (inputs, target) -> attributions or have .attribute, got {type(method).__name__}"
        )
    if isinstance(out, tuple):
        out = out[0]
    return out.detach()


def _batches(
    images: Tensor | Iterable[tuple[Tensor, Tensor]], labels: Tensor | None, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(images, Tensor):
        if labels is None:
            raise InputValidationError(
                "labels are needed with an image tensor: pass labels=(N,) class indices"
            )
        labels = torch.as_tensor(labels)
        if labels.shape != (images.shape[0],):
            raise InputValidationError(
                f"labels must be (N,) = ({images.shape[0]},), got {tuple(labels.shape)}"
            )
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]
    else:
        if labels is not None:
            raise InputValidationError("with an iterable of (images, labels) batches, leave labels=None")
        for batch in images:
            x, y = batch[0], batch[1]
            yield x, torch.as_tensor(y)


def compare_explanations(
    model: nn.Module | ModelAdapter,
    images: Tensor | Iterable[tuple[Tensor, Tensor]],
    labels: Tensor | None = None,
    methods: dict[str, Method] | None = None,
    fractions: Sequence[float] | Tensor = DEFAULT_FRACTIONS,
    batch_size: int = 32,
    score: str = "accuracy",
    explain_target: str = "label",
    protocol: str = "tokens",
    baseline: float | Tensor = 0.0,
    probe_data: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
    max_examples_per_batch: int | None = None,
    progress: bool = False,
) -> ComparisonResults:
    r"""Run negative and positive perturbation tests for several explanation methods.

    Streams over the images in batches: each batch is explained by every method and
    scored by :func:`token_removal_auc` (``protocol="tokens"``, the paper's test: tokens
    dropped after the position embedding) or :func:`pixel_removal_auc`
    (``protocol="pixels"``, Chefer et al.'s test), keeping only the per-example curves
    (N x S numbers per method and mode), never per-class logits of the whole set.

    Args:
        model: a supported ViT or its adapter.
        images: images (N, C, H, W) with ``labels``, or an iterable of ``(images, labels)``
            batches (e.g. a DataLoader) with ``labels=None``.
        labels: ground-truth classes (N,).
        methods: ``{name: method}``; a method is an object with ``.attribute(inputs,
            target=...)``, a class constructed as ``cls(model)``, or a callable
            ``(inputs, target) -> attributions``, returning (N, 1, h, w) on the patch grid
            (or pixel maps for ``protocol="pixels"``). Default: :func:`default_methods`
            (without the class-token methods on models that have no class token; the
            results' ``notes`` say what was left out).
        fractions: removal fractions. Default: 0, 0.1, ..., 0.9.
        batch_size: images per batch (tensor input). Default: 32.
        score: ``"accuracy"`` (vs the labels), ``"probability"`` or ``"logit"`` of the
            explained class.
        explain_target: ``"label"`` (explain and score the ground-truth class, as Vilas et
            al.) or ``"predicted"`` (the model's top class, Chefer's ``--vis-class top``).
        protocol: ``"tokens"`` or ``"pixels"``.
        baseline: value of removed pixels for ``protocol="pixels"``.
        probe_data: ``(images, labels)`` for the default linear-probe ranking.
        seed: seed of the default random ranking.
        max_examples_per_batch: forwarded to the metric.
        progress: show a progress bar (tqdm).
    Returns:
        :class:`ComparisonResults`; see :func:`to_markdown`, :func:`to_csv`, :func:`plot_curves`.

    Examples::

        >>> res = compare_explanations(model, x, y, probe_data=(x_train, y_train))
        >>> print(to_markdown(res))
    """
    check_options("negative", score, "trapezoid")
    if explain_target not in ("label", "predicted"):
        raise InputValidationError(f"explain_target must be 'label' or 'predicted', got {explain_target!r}")
    if protocol not in ("tokens", "pixels"):
        raise InputValidationError(f"protocol must be 'tokens' or 'pixels', got {protocol!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputValidationError(f"batch_size must be a positive int, got {batch_size!r}")
    fr = check_fractions(fractions)
    adapter = adapt(model)
    if methods is None:
        methods = default_methods(adapter, probe_data=probe_data, seed=seed)
    if not methods:
        raise InputValidationError("methods is empty: give at least one explanation method")
    notes = list(getattr(methods, "notes", ()))
    methods = {name: (m(adapter.model) if isinstance(m, type) else m) for name, m in methods.items()}
    names = list(methods)
    collected: dict[str, dict[str, list[Tensor]]] = {m: {mode: [] for mode in MODES} for m in names}
    seconds = dict.fromkeys(names, 0.0)
    clean_total, count = 0.0, 0
    metric = token_removal_auc if protocol == "tokens" else pixel_removal_auc
    extra = {} if protocol == "tokens" else {"baseline": baseline}

    batches = _batches(images, labels, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="compare_explanations")
    for x, y in batches:
        if isinstance(x, Tensor) and x.dim() > 0:
            check_finite(x, "images", first_index=count)  # indices counted over the whole stream
        x = adapter.check_inputs(x)
        y = y.to(x.device).long()
        with torch.no_grad(), adapter.eval_mode():
            clean = adapter.model_logits(x)
        t = y if explain_target == "label" else clean.argmax(-1)
        clean_total += float(score_logits(clean, t, y, score).sum())
        count += x.shape[0]
        for name, method in methods.items():
            t0 = time.perf_counter()
            attr = _explain(method, x, t)
            seconds[name] += time.perf_counter() - t0
            for mode in MODES:
                _, curves = metric(adapter, x, attr, target=t, labels=y, mode=mode, fractions=fr, score=score,
                                   return_curve=True, max_examples_per_batch=max_examples_per_batch, **extra)  # fmt: skip
                collected[name][mode].append(curves.detach().cpu())
    if count == 0:
        raise InputValidationError("no images were given")
    return ComparisonResults(
        methods=names,
        fractions=fr.float(),
        curves={m: {mode: torch.cat(v) for mode, v in d.items()} for m, d in collected.items()},
        clean_score=clean_total / count,
        seconds=seconds,
        num_images=count,
        score=score,
        protocol=protocol,
        explain_target=explain_target,
        notes=notes,
    )


def _describe(results: ComparisonResults) -> str:
    test = (
        "tokens dropped from the sequence after the position embedding"
        if results.protocol == "tokens"
        else "pixels replaced by a baseline"
    )
    fr = results.fractions.tolist()
    return (
        f"Perturbation test ({test}); score: {results.score}; explanations of the {results.explain_target} class; "
        f"{results.num_images} images; clean {results.score}: {results.clean_score:.4f}. "
        f"AUC = trapezoid over removal fractions {fr[0]:g}..{fr[-1]:g} x 100 (mean ± s.e.m. over images; "
        f"max {100 * (fr[-1] - fr[0]):g}); 'authors' = sum(curve) / (max(curve) * {len(fr) + 1}) of the mean curve "
        "(Vilas et al.'s normalised sum, not an area; the denominator is the number of curve points + 1, "
        "which is the number of patches P on their curve of 1..P-1 kept tokens)."
    )


def to_markdown(results: ComparisonResults, digits: int = 2) -> str:
    r"""A Markdown table: negative (higher better) and positive (lower better) AUC per method.

    Args:
        results: output of :func:`compare_explanations`.
        digits: decimals of the trapezoid AUCs. Default: 2.
    Returns:
        the description line, the notes when there are any (a list of the methods left out
        and why, and caveats), a blank line and the table.
    """
    notes = ["", "Notes:", *(f"- {note}" for note in results.notes)] if results.notes else []
    lines = [
        _describe(results),
        *notes,
        "",
        "| Method | Negative AUC ↑ | Positive AUC ↓ | Neg − Pos ↑ | Negative (authors) ↑ | Positive (authors) ↓ "
        "| Attribution ms/image |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in results.methods:
        neg, pos = results.auc(m, "negative"), results.auc(m, "positive")
        ns, ps = results.auc_sem(m, "negative"), results.auc_sem(m, "positive")
        lines.append(
            f"| {m} | {neg:.{digits}f} ± {ns:.{digits}f} | {pos:.{digits}f} ± {ps:.{digits}f} | {neg - pos:.{digits}f} "
            f"| {results.auc(m, 'negative', 'authors'):.4f} | {results.auc(m, 'positive', 'authors'):.4f} "
            f"| {1000 * results.seconds[m] / results.num_images:.2f} |"
        )
    return "\n".join(lines) + "\n"


def to_csv(results: ComparisonResults, path: str | Path) -> Path:
    r"""Write one row per (method, mode): AUCs, attribution time and the mean curve.

    Columns: ``method, mode, auc_trapezoid, auc_sem, auc_authors, ms_per_image,
    score@<fraction>...``.

    Args:
        results: output of :func:`compare_explanations`.
        path: the CSV file to write.
    Returns:
        the path written.
    """
    path = Path(path)
    rows = results.rows()
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_curves(results: ComparisonResults, title: str | None = None):
    r"""Mean perturbation curves per method: negative test (left) and positive test (right).

    Args:
        results: output of :func:`compare_explanations`.
        title: figure title. Default: a description of the run.
    Returns:
        a ``matplotlib.figure.Figure`` (not attached to pyplot; save with ``fig.savefig``).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    x = (results.fractions * 100).tolist()
    for ax, mode, better in zip(axes, MODES, ("higher AUC is better", "lower AUC is better")):
        for m in results.methods:
            ax.plot(x, results.mean_curve(m, mode).tolist(), marker="o", ms=3,
                    label=f"{m} ({results.auc(m, mode):.1f})")  # fmt: skip
        ax.set_title(f"{mode.capitalize()} perturbation ({better})")
        ax.set_xlabel("% of tokens removed" if results.protocol == "tokens" else "% of pixels removed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(results.score)
    fig.suptitle(
        title
        or f"{results.num_images} images, explanations of the {results.explain_target} class, "
        f"clean {results.score} {results.clean_score:.3f}"
    )
    return fig
