r"""Percentile bootstrap confidence intervals (``scipy.stats.bootstrap``), one per block.

The unit that is resampled is the unit of the data's first axis: images for per-image
values (identifiability, accuracy, per-image AUC), classes for per-class values. Tokens of
one image are not independent, so rates pooled over tokens are resampled by image with
:func:`bootstrap_ratio_ci` (the ratio of the resampled sums).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats as st

from captum_clsemb.errors import InputValidationError
from captum_clsemb.stats._results import ConfidenceInterval, as_samples, check_resamples, check_seed

STATISTICS: dict[str, Callable[..., np.ndarray]] = {"mean": np.mean, "median": np.median}


def _check_level(confidence_level: float) -> float:
    if not isinstance(confidence_level, (int, float)) or not 0 < confidence_level < 1:
        raise InputValidationError(f"confidence_level must lie in (0, 1), got {confidence_level!r}")
    return float(confidence_level)


def _batch(batch: int | None, n: int, blocks: int) -> int:
    if batch is not None:
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise InputValidationError(f"batch must be a positive int, got {batch!r}")
        return batch
    return max(1, (1 << 24) // max(1, n * blocks))


def _squeeze(v: np.ndarray, batched: bool) -> Any:
    v = np.asarray(v, dtype=float)
    return v if batched else float(v)


def bootstrap_ci(
    values: Any,
    statistic: str = "mean",
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
    seed: int | None = 0,
    batch: int | None = None,
) -> ConfidenceInterval:
    r"""Percentile bootstrap confidence interval of a mean (or median), per block.

    ``scipy.stats.bootstrap((values,), np.mean, axis=0, method="percentile",
    confidence_level=..., n_resamples=..., rng=seed)``: the units along axis 0 (images,
    classes ...) are resampled with replacement, the same resamples for every block. Use it
    for every mean and rate over images: identifiability rate per block (per-image rates),
    mean identifiability per block, accuracy (0/1 per image), mean AUC (per-image AUCs).

    Fewer than two units give NaN bounds (no interval from one value).

    Args:
        values: (N,) or (N, B) per-unit values.
        statistic: ``"mean"`` (default) or ``"median"``.
        confidence_level: Default: 0.95.
        n_resamples: bootstrap resamples. Default: 9999.
        seed: seed of the resampling (an int makes the interval reproducible). Default: 0.
        batch: resamples per vectorised step. Default: about :math:`2^{24}` numbers per step.
    Returns:
        :class:`~captum_clsemb.stats.ConfidenceInterval` (floats, or (B,) arrays).

    Examples::

        >>> ci = bootstrap_ci(per_image_rate)          # (N, blocks) -> one interval per block
        >>> ci.low, ci.high, ci.to_dict()
    """
    if statistic not in STATISTICS:
        raise InputValidationError(f"statistic must be one of {tuple(STATISTICS)}, got {statistic!r}")
    level = _check_level(confidence_level)
    check_resamples(n_resamples)
    check_seed(seed)
    v = as_samples(values, "values")
    if v.shape[0] == 0:
        raise InputValidationError("values are empty: no unit to resample")
    batched = v.ndim == 2
    func = STATISTICS[statistic]
    estimate = func(v, axis=0)
    if v.shape[0] < 2:
        low = high = np.full(np.shape(estimate), np.nan)
    else:
        res = st.bootstrap(
            (v,),
            func,
            n_resamples=n_resamples,
            batch=_batch(batch, v.shape[0], v.shape[1] if batched else 1),
            vectorized=True,
            axis=0,
            confidence_level=level,
            method="percentile",
            rng=seed,
        )
        low, high = res.confidence_interval.low, res.confidence_interval.high
    return ConfidenceInterval(
        _squeeze(estimate, batched),
        _squeeze(low, batched),
        _squeeze(high, batched),
        level,
        "percentile",
        statistic,
        int(v.shape[0]),
        n_resamples,
        seed,
    )


def _ratio(num: np.ndarray, den: np.ndarray, axis: int) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(num, axis=axis) / np.sum(den, axis=axis)


def bootstrap_ratio_ci(
    numerator: Any,
    denominator: Any,
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
    seed: int | None = 0,
    batch: int | None = None,
) -> ConfidenceInterval:
    r"""Percentile bootstrap interval of a pooled rate :math:`\sum_i a_i / \sum_i c_i`, resampling units.

    For rates pooled over tokens when units (images) hold different numbers of tokens, e.g.
    the mean identifiability of class-labelled tokens (``a_i`` = sum of the scores of image
    i's class tokens, ``c_i`` = their number). Numerator and denominator of a unit are
    resampled together (``scipy.stats.bootstrap(..., paired=True)``).

    Args:
        numerator: (N,) or (N, B) per-unit sums.
        denominator: (N,) or (N, B) per-unit counts (or weights), same shape.
        confidence_level, n_resamples, seed, batch: see :func:`bootstrap_ci`.
    Returns:
        :class:`~captum_clsemb.stats.ConfidenceInterval` with ``statistic="ratio_of_sums"``.
        Units with a zero denominator still count as units; if some resample's
        denominators sum to 0 (only likely when nearly all units have none), its ratio is
        undefined and the interval is NaN.
    """
    level = _check_level(confidence_level)
    check_resamples(n_resamples)
    check_seed(seed)
    a, c = as_samples(numerator, "numerator"), as_samples(denominator, "denominator")
    if a.shape != c.shape:
        raise InputValidationError(
            f"numerator and denominator must have the same shape, got {a.shape} and {c.shape}"
        )
    if a.shape[0] == 0:
        raise InputValidationError("no units to resample")
    if (c < 0).any():
        raise InputValidationError("denominator values must be >= 0 (counts or weights)")
    batched = a.ndim == 2
    estimate = _ratio(a, c, 0)
    if a.shape[0] < 2:
        low = high = np.full(np.shape(estimate), np.nan)
    else:
        with warnings.catch_warnings():
            # resamples whose denominators sum to 0 give NaN, and scipy warns about degenerate data
            warnings.simplefilter("ignore", st.DegenerateDataWarning)
            res = st.bootstrap(
                (a, c),
                _ratio,
                n_resamples=n_resamples,
                batch=_batch(batch, a.shape[0] * 2, a.shape[1] if batched else 1),
                vectorized=True,
                paired=True,
                axis=0,
                confidence_level=level,
                method="percentile",
                rng=seed,
            )
        low, high = res.confidence_interval.low, res.confidence_interval.high
    return ConfidenceInterval(
        _squeeze(estimate, batched),
        _squeeze(low, batched),
        _squeeze(high, batched),
        level,
        "percentile",
        "ratio_of_sums",
        int(a.shape[0]),
        n_resamples,
        seed,
    )
