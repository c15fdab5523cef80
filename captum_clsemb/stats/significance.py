r"""The paper's significance tests on ``scipy.stats``, one test per block in one call.

Every function takes samples along axis 0: ``(N,)`` for one test or ``(N, B)`` for one test
per column (block), computed by the vectorised ``scipy.stats`` call with ``axis=0``, and
returns a :class:`~captum_clsemb.stats.TestResult` with the statistic, p-value, effect size,
sample size and, for several blocks, Benjamini-Hochberg adjusted p-values across the blocks.
Resampling tests take a ``seed``, so that every p-value is reproducible.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from scipy import stats as st

from captum_clsemb.errors import InputValidationError
from captum_clsemb.stats._results import (
    TestResult,
    as_samples,
    check_alternative,
    check_resamples,
    check_seed,
    make_result,
)

ZERO_METHODS = ("wilcox", "pratt", "zsplit")
AUC_MODES = {"negative": "greater", "positive": "less"}


def _pair(x: Any, y: Any | None) -> tuple[np.ndarray, bool]:
    """Paired differences x - y (N,) or (N, B), and whether there are several blocks."""
    a = as_samples(x, "x")
    if y is not None:
        b = as_samples(y, "y")
        if a.shape != b.shape:
            raise InputValidationError(
                f"paired samples need equal shapes (the same units in the same order), got {a.shape} and {b.shape}"
            )
        a = a - b
    if a.shape[0] < 1:
        raise InputValidationError("no samples: x is empty")
    return a, a.ndim == 2


def _rank_biserial_paired(d: np.ndarray, zero_method: str) -> tuple[np.ndarray, np.ndarray]:
    r"""Matched-pairs rank-biserial correlation :math:`(R^+ - R^-) / (R^+ + R^-)` per column,
    with the ranks of :math:`|d|` the test uses (zeros dropped for ``"wilcox"``); and the
    number of ranked pairs."""
    d = d if d.ndim == 2 else d[:, None]
    if zero_method == "wilcox":
        a = np.where(d == 0, np.nan, np.abs(d))
    else:
        a = np.abs(d)
    ranks = st.rankdata(a, axis=0, nan_policy="omit")  # NaN (dropped zeros) stay NaN
    n = np.isfinite(ranks).sum(0)
    r_plus = np.nansum(np.where(d > 0, ranks, 0.0), axis=0)
    r_minus = np.nansum(np.where(d < 0, ranks, 0.0), axis=0)
    total = n * (n + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(total > 0, (r_plus - r_minus) / np.where(total > 0, total, 1), np.nan)
    return r, n


def wilcoxon_signed_rank(
    x: Any,
    y: Any | None = None,
    alternative: str = "greater",
    zero_method: str = "wilcox",
    method: str = "auto",
    correction: str | None = "bh",
) -> TestResult:
    r"""Wilcoxon signed-rank test of paired samples, per block (``scipy.stats.wilcoxon``).

    The paper's test of a trained model against its random-init copy (Fig. 2 and Fig. 4a
    stars: one-sided, ``alternative="greater"``), paired by unit: per image (or per token,
    as the authors pooled tokens) for identifiability, per class for class-value agreement;
    and of per-image perturbation AUCs against a baseline ranking
    (:func:`paired_auc_test`).

    Effect size: the matched-pairs rank-biserial correlation
    :math:`r = (R^+ - R^-) / (n(n+1)/2)` from the signed ranks of the :math:`n` ranked
    differences (1: every difference favours x; -1: every one favours y).

    Args:
        x: (N,) or (N, B) samples, e.g. per-image mean identifiability per block of the
            trained model.
        y: the paired samples of the other condition (same shape, same units in the same
            order), or None when ``x`` already holds the differences.
        alternative: ``"greater"`` (x > y, default), ``"less"`` or ``"two-sided"``.
        zero_method: ``"wilcox"`` (default: zero differences are dropped), ``"pratt"`` or
            ``"zsplit"``, as ``scipy.stats.wilcoxon``.
        method: ``"auto"`` (exact for small samples without ties), ``"exact"`` or
            ``"asymptotic"``, as ``scipy.stats.wilcoxon``.
        correction: ``"bh"`` (Benjamini-Hochberg across blocks, default) or None.
    Returns:
        :class:`~captum_clsemb.stats.TestResult` (``test="wilcoxon_signed_rank"``); details:
        ``mean_difference``, ``median_difference``, ``n_pairs`` (all pairs, zeros included),
        ``zero_method``. A block whose differences are all zero has p = 1 and effect NaN.

    Examples::

        >>> res = wilcoxon_signed_rank(trained_per_image, random_per_image)   # (N, blocks) each
        >>> res.p_value, res.p_value_adjusted, res.to_dict()["effect_size"]
    """
    check_alternative(alternative)
    if zero_method not in ZERO_METHODS:
        raise InputValidationError(f"zero_method must be one of {ZERO_METHODS}, got {zero_method!r}")
    d, batched = _pair(x, y)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        # a block of all-zero differences: scipy returns p = 1 after a 0/0 in its normal approximation
        warnings.simplefilter("ignore", RuntimeWarning)
        res = st.wilcoxon(d, zero_method=zero_method, alternative=alternative, method=method, axis=0)
    r, n = _rank_biserial_paired(d, zero_method)
    return make_result(
        "wilcoxon_signed_rank",
        res.statistic,
        res.pvalue,
        r,
        "rank_biserial",
        n,
        alternative,
        batched,
        correction,
        {
            "mean_difference": np.mean(d, axis=0),
            "median_difference": np.median(d, axis=0),
            "n_pairs": d.shape[0],
            "zero_method": zero_method,
        },
    )


def mann_whitney_u(
    x: Any,
    y: Any,
    alternative: str = "greater",
    method: str = "auto",
    correction: str | None = "bh",
) -> TestResult:
    r"""Mann-Whitney U test of two independent samples, per block (``scipy.stats.mannwhitneyu``).

    The paper's comparison of key-value agreement between correctly and incorrectly
    classified images (Sec. 6: higher for correct ones, ``alternative="greater"``).

    Effect size: the rank-biserial correlation :math:`r = 2U_x / (n_x n_y) - 1`, where
    :math:`U_x / (n_x n_y)` is the probability that a value of x exceeds one of y (ties
    count half), reported as ``prob_superiority`` in the details.

    Args:
        x: (n_x,) or (n_x, B) samples, e.g. per-image agreement of correct images.
        y: (n_y,) or (n_y, B) samples of the other group (same number of blocks).
        alternative: ``"greater"`` (default), ``"less"`` or ``"two-sided"``.
        method: ``"auto"``, ``"exact"`` or ``"asymptotic"``, as ``scipy.stats.mannwhitneyu``
            (continuity correction on).
        correction: ``"bh"`` (default) or None.
    Returns:
        :class:`~captum_clsemb.stats.TestResult` (``test="mann_whitney_u"``, statistic
        :math:`U_x`); details: ``n_x``, ``n_y``, ``mean_x``, ``mean_y``, ``prob_superiority``.
    """
    check_alternative(alternative)
    a, b = as_samples(x, "x"), as_samples(y, "y")
    if a.ndim != b.ndim or a.shape[1:] != b.shape[1:]:
        raise InputValidationError(
            f"x and y must have the same number of blocks, got {a.shape} and {b.shape}"
        )
    if a.shape[0] < 1 or b.shape[0] < 1:
        raise InputValidationError(
            f"both groups need at least one sample, got {a.shape[0]} and {b.shape[0]} "
            "(e.g. no misclassified image: the comparison is undefined)"
        )
    res = st.mannwhitneyu(a, b, alternative=alternative, method=method, axis=0)
    nx, ny = a.shape[0], b.shape[0]
    prob = np.asarray(res.statistic, dtype=float) / (nx * ny)
    return make_result(
        "mann_whitney_u",
        res.statistic,
        res.pvalue,
        2 * prob - 1,
        "rank_biserial",
        nx + ny,
        alternative,
        a.ndim == 2,
        correction,
        {
            "n_x": nx,
            "n_y": ny,
            "mean_x": np.mean(a, axis=0),
            "mean_y": np.mean(b, axis=0),
            "prob_superiority": prob,
        },
    )


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def _paired_mean_difference(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    return np.mean(a - b, axis=axis)


def _batch_size(batch: int | None, n: int, blocks: int) -> int:
    """Resamples per vectorised call: about 2**24 numbers at a time unless given."""
    if batch is not None:
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise InputValidationError(f"batch must be a positive int, got {batch!r}")
        return batch
    return max(1, (1 << 24) // max(1, n * blocks))


def permutation_test(
    x: Any,
    y: Any,
    alternative: str = "greater",
    paired: bool = False,
    n_resamples: int = 9999,
    seed: int | None = 0,
    batch: int | None = None,
    correction: str | None = "bh",
) -> TestResult:
    r"""Permutation test of a difference of means, per block (``scipy.stats.permutation_test``).

    The paper's Fig. 3a test: is the mean identifiability of class-labelled tokens higher
    than that of context-labelled tokens (the authors: one-sided, 300 shuffles of the token
    labels). The statistic is ``mean(x) - mean(y)``.

    - ``paired=False`` (default): x and y are independent samples (e.g. pooled class and
      context tokens); the group labels are shuffled (``permutation_type="independent"``).
    - ``paired=True``: x and y are paired (same shape, e.g. per image the mean of its class
      tokens and of its context tokens); each pair is swapped at random, i.e. the signs of
      the differences are flipped (``permutation_type="samples"``).

    The same resamples are used for every block. With at least as many resamples as
    distinct permutations scipy runs the exact test. p-values are scipy's:
    :math:`(1 + \#\{\text{null} \ge \text{observed}\}) / (1 + R)` for ``"greater"`` (the
    authors counted strictly greater shuffles, without the +1).

    Effect size: Cohen's d, the mean difference over the pooled standard deviation
    (independent) or over the standard deviation of the differences (paired, :math:`d_z`).

    Args:
        x: (n_x,) or (n_x, B) samples of the first group.
        y: (n_y,) or (n_y, B) samples of the second group.
        alternative: ``"greater"`` (mean(x) > mean(y), default), ``"less"`` or ``"two-sided"``.
        paired: see above. Default: False.
        n_resamples: random permutations. Default: 9999 (the authors used 300).
        seed: seed of the permutations (an int makes the p-value reproducible). Default: 0.
        batch: permutations evaluated per vectorised step (memory bound). Default: about
            :math:`2^{24}` numbers per step.
        correction: ``"bh"`` (default) or None.
    Returns:
        :class:`~captum_clsemb.stats.TestResult` (``test="permutation_test"``); details:
        ``n_x``, ``n_y``, ``mean_x``, ``mean_y``, ``paired``, ``n_resamples`` (the number of
        permutations in the null distribution), ``exact``, ``seed``.
    """
    check_alternative(alternative)
    check_resamples(n_resamples)
    check_seed(seed)
    a, b = as_samples(x, "x"), as_samples(y, "y")
    if paired and a.shape != b.shape:
        raise InputValidationError(f"paired samples need equal shapes, got {a.shape} and {b.shape}")
    if a.ndim != b.ndim or a.shape[1:] != b.shape[1:]:
        raise InputValidationError(
            f"x and y must have the same number of blocks, got {a.shape} and {b.shape}"
        )
    if a.shape[0] < 1 or b.shape[0] < 1:
        raise InputValidationError(f"both groups need at least one sample, got {a.shape[0]} and {b.shape[0]}")
    blocks = a.shape[1] if a.ndim == 2 else 1
    res = st.permutation_test(
        (a, b),
        _paired_mean_difference if paired else _mean_difference,
        permutation_type="samples" if paired else "independent",
        vectorized=True,
        n_resamples=n_resamples,
        batch=_batch_size(batch, a.shape[0] + b.shape[0], blocks),
        alternative=alternative,
        axis=0,
        rng=seed,
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        if paired:
            d = a - b
            sd = np.std(d, axis=0, ddof=1) if d.shape[0] > 1 else np.full(d.shape[1:], np.nan)
        else:
            squares = ((a - a.mean(0)) ** 2).sum(0) + ((b - b.mean(0)) ** 2).sum(0)
            dof = a.shape[0] + b.shape[0] - 2
            sd = np.sqrt(squares / dof) if dof > 0 else np.full(a.shape[1:], np.nan)
        effect = np.asarray(res.statistic, dtype=float) / np.where(sd > 0, sd, np.nan)
    used = int(np.shape(res.null_distribution)[0])
    return make_result(
        "permutation_test",
        res.statistic,
        res.pvalue,
        effect,
        "cohens_d",
        a.shape[0] if paired else a.shape[0] + b.shape[0],
        alternative,
        a.ndim == 2,
        correction,
        {
            "statistic_name": "mean_difference",
            "n_x": a.shape[0],
            "n_y": b.shape[0],
            "mean_x": np.mean(a, axis=0),
            "mean_y": np.mean(b, axis=0),
            "paired": paired,
            "n_resamples": used,
            "exact": used < n_resamples,
            "seed": seed,
        },
    )


def paired_auc_test(
    auc: Any,
    baseline_auc: Any,
    mode: str = "negative",
    method: str = "auto",
    correction: str | None = "bh",
) -> TestResult:
    r"""Is an explanation's perturbation AUC better than a baseline ranking's, image by image?

    The paper's Sec. 7 (against the random removal order) and Sec. 8 (against the
    linear-probe order) claims. Per-image AUCs of the two rankings on the same images are
    paired and compared with the one-sided Wilcoxon signed-rank test in the direction of
    "better": ``mode="negative"`` (least important removed first) — higher is better,
    ``alternative="greater"``; ``mode="positive"`` — lower is better, ``alternative="less"``.

    Use per-image trapezoid AUCs (e.g. ``trapezoid_auc(results.curves[m][mode],
    results.fractions)``); the authors' normalised sum divides by a per-method maximum of
    the *mean* curve and is not a per-image quantity.

    Args:
        auc: (N,) per-image AUCs of the explanation (or (N, B) for several settings).
        baseline_auc: (N,) per-image AUCs of the baseline ranking on the same images.
        mode: ``"negative"`` or ``"positive"``.
        method: see :func:`wilcoxon_signed_rank`.
        correction: for (N, B) inputs, ``"bh"`` (default) or None.
    Returns:
        :class:`~captum_clsemb.stats.TestResult` (``test="wilcoxon_signed_rank"``) with
        ``mode`` and ``mean_difference`` (explanation minus baseline) in the details.
    """
    if mode not in AUC_MODES:
        raise InputValidationError(f"mode must be one of {tuple(AUC_MODES)}, got {mode!r}")
    res = wilcoxon_signed_rank(
        auc, baseline_auc, alternative=AUC_MODES[mode], method=method, correction=correction
    )
    details = dict(res.details)
    details["mode"] = mode
    details["comparison"] = "paired per-image perturbation AUC"
    return replace(res, details=details)


def perturbation_auc_tests(
    aucs: Mapping[str, Mapping[str, Any]],
    method: str = "ClassEmbeddingGradient",
    baselines: Iterable[str] = ("Random", "LinearProbe"),
    modes: Iterable[str] = ("negative", "positive"),
) -> dict[str, dict[str, TestResult]]:
    r""":func:`paired_auc_test` of one method against each baseline ranking, for both modes.

    Args:
        aucs: ``aucs[name][mode]`` per-image AUCs (N,) of every method on the same images.
        method: the explanation to test. Default: ``"ClassEmbeddingGradient"``.
        baselines: the rankings to beat; those missing from ``aucs`` are skipped. Default:
            ``("Random", "LinearProbe")`` (Sec. 7 and Sec. 8).
        modes: Default: both.
    Returns:
        ``{mode: {baseline: TestResult}}``.

    Examples::

        >>> aucs = {m: {mode: trapezoid_auc(res.curves[m][mode], res.fractions) for mode in res.curves[m]}
        ...         for m in res.methods}
        >>> perturbation_auc_tests(aucs)["negative"]["Random"].p_value
    """
    if method not in aucs:
        raise InputValidationError(f"method {method!r} has no AUCs; available: {sorted(aucs)}")
    out: dict[str, dict[str, TestResult]] = {}
    for mode in modes:
        out[mode] = {}
        for base in baselines:
            if base in aucs and base != method:
                out[mode][base] = paired_auc_test(aucs[method][mode], aucs[base][mode], mode=mode)
    return out
