r"""Result containers of the statistical tests and confidence intervals, and shared helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats as st

from captum_clsemb.errors import InputValidationError

ALTERNATIVES = ("greater", "less", "two-sided")


def as_array(values: Any, name: str) -> np.ndarray:
    """A float64 array from an array-like or a (CPU or GPU) tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputValidationError(
            f"{name} must be numbers (an array or tensor), got {type(values).__name__}"
        ) from e
    return arr


def as_samples(values: Any, name: str, allow_nan: bool = False) -> np.ndarray:
    """Samples along axis 0: (N,) for one test, (N, B) for one test per column (block)."""
    arr = as_array(values, name)
    if arr.ndim not in (1, 2):
        raise InputValidationError(
            f"{name} must be (N,) or (N, blocks) with the samples (images, tokens, classes) along axis 0, "
            f"got shape {arr.shape}"
        )
    if not allow_nan and not np.isfinite(arr).all():
        raise InputValidationError(
            f"{name} holds NaN or infinite values; drop the undefined samples (e.g. images without tokens of "
            "a group) before testing"
        )
    return arr


def check_alternative(alternative: str) -> str:
    if alternative not in ALTERNATIVES:
        raise InputValidationError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    return alternative


def check_seed(seed: int | None) -> int | None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise InputValidationError(
            f"seed must be a non-negative int (or None for an unseeded run), got {seed!r}"
        )
    return seed


def check_resamples(n_resamples: int) -> int:
    if not isinstance(n_resamples, int) or isinstance(n_resamples, bool) or n_resamples < 1:
        raise InputValidationError(f"n_resamples must be a positive int, got {n_resamples!r}")
    return n_resamples


def benjamini_hochberg(p_values: Any) -> np.ndarray:
    r"""Benjamini-Hochberg adjusted p-values (false discovery rate) across blocks.

    ``scipy.stats.false_discovery_control(p, method="bh")`` over the finite entries; NaN
    entries (untestable blocks) stay NaN and do not count as tests.

    Args:
        p_values: (B,) p-values, one per block.
    Returns:
        *ndarray* (B,) adjusted p-values; reject at level :math:`q` where ``adjusted <= q``.

    Examples::

        >>> benjamini_hochberg([0.01, 0.04, 0.03, 0.5])   # [0.04, 0.0533, 0.0533, 0.5]
    """
    p = as_array(p_values, "p_values")
    if p.ndim != 1:
        raise InputValidationError(f"p_values must be 1-D (one per block), got shape {p.shape}")
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        if (p[ok] < 0).any() or (p[ok] > 1).any():
            raise InputValidationError("p_values must lie in [0, 1]")
        out[ok] = st.false_discovery_control(p[ok], method="bh")
    return out


def significance_stars(p_values: Any, levels: tuple[float, ...] = (0.05, 0.01, 0.001)) -> str | list[str]:
    r"""Stars for p-values: one per level the p-value is below (``"*"`` for p < 0.05 by default).

    The authors' figures mark p < .05 with one star (``levels=(0.05,)``). NaN gives ``""``.

    Args:
        p_values: a p-value or a sequence of them.
        levels: significance levels, in decreasing order.
    Returns:
        a string, or a list of strings for a sequence.
    """
    arr = as_array(p_values, "p_values")

    def one(p: float) -> str:
        return "" if not math.isfinite(p) else "*" * sum(p < lv for lv in levels)

    return one(float(arr)) if arr.ndim == 0 else [one(float(p)) for p in arr.ravel()]


def _plain(value: Any) -> Any:
    """numpy / tensor values -> JSON-ready Python (NaN and infinities become None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    return value


def _squeeze(value: Any, batched: bool) -> Any:
    """Scalars for a single test, (B,) arrays for one test per block."""
    arr = np.asarray(value)
    if batched:
        return arr
    return arr.item() if arr.ndim == 0 or arr.size == 1 else arr


@dataclass(frozen=True)
class TestResult:
    r"""One statistical test, or one test per block (then every number is a (B,) array).

    Attributes:
        test: the test's name, e.g. ``"wilcoxon_signed_rank"``.
        statistic: the test statistic as ``scipy.stats`` returns it.
        p_value: p-value(s) for ``alternative``.
        effect_size: effect size(s), see ``effect_size_name``.
        effect_size_name: e.g. ``"rank_biserial"`` or ``"cohens_d"``.
        n: number of samples that entered the test (pairs with a nonzero difference for
            the signed-rank test; ``n_x + n_y`` for two-sample tests).
        alternative: ``"greater"``, ``"less"`` or ``"two-sided"`` (x versus y).
        p_value_adjusted: Benjamini-Hochberg adjusted p-values across the blocks of the
            call (None for a single test).
        correction: ``"benjamini-hochberg"`` or None.
        details: further numbers and settings (sample sizes, mean difference, seed,
            number of resamples, the unit of analysis ...), written into :meth:`to_dict`.
    """

    __test__ = False  # not a pytest test class

    test: str
    statistic: Any
    p_value: Any
    effect_size: Any
    effect_size_name: str
    n: Any
    alternative: str
    p_value_adjusted: Any = None
    correction: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def batched(self) -> bool:
        """True when the result holds one test per block."""
        return np.ndim(self.p_value) == 1

    def __len__(self) -> int:
        return int(np.size(self.p_value)) if self.batched else 1

    def block(self, index: int) -> TestResult:
        """The test of one block (its adjusted p-value is the one within this call's blocks)."""
        if not self.batched:
            raise InputValidationError("this result holds a single test; block() needs a per-block result")

        def pick(v: Any) -> Any:
            return np.asarray(v)[index].item() if np.ndim(v) == 1 else v

        return replace(
            self,
            statistic=pick(self.statistic),
            p_value=pick(self.p_value),
            effect_size=pick(self.effect_size),
            n=pick(self.n),
            p_value_adjusted=None if self.p_value_adjusted is None else pick(self.p_value_adjusted),
            details={k: pick(v) for k, v in self.details.items()},
        )

    def significant(self, alpha: float = 0.05, adjusted: bool | None = None) -> Any:
        r"""Whether each test rejects at ``alpha``: on the adjusted p-values when available
        (``adjusted=None``, the default), else on the raw ones. NaN p-values never reject."""
        use_adj = self.p_value_adjusted is not None if adjusted is None else adjusted
        if use_adj and self.p_value_adjusted is None:
            raise InputValidationError("no adjusted p-values: this result holds a single test")
        p = np.asarray(self.p_value_adjusted if use_adj else self.p_value, dtype=float)
        out = np.where(np.isfinite(p), p <= alpha if use_adj else p < alpha, False)
        return out if self.batched else bool(out)

    def stars(self, levels: tuple[float, ...] = (0.05, 0.01, 0.001), adjusted: bool | None = None) -> Any:
        """:func:`significance_stars` of the (adjusted, when available) p-values."""
        use_adj = self.p_value_adjusted is not None if adjusted is None else adjusted
        return significance_stars(self.p_value_adjusted if use_adj else self.p_value, levels)

    def to_dict(self) -> dict[str, Any]:
        r"""A JSON-ready dict: ``test``, ``statistic``, ``p_value``, ``effect_size``,
        ``effect_size_name``, ``n``, ``alternative`` and, for per-block results,
        ``p_value_adjusted`` and ``correction``, then the ``details``. Per-block numbers are
        lists; undefined numbers (NaN) are None."""
        out: dict[str, Any] = {
            "test": self.test,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "effect_size": self.effect_size,
            "effect_size_name": self.effect_size_name,
            "n": self.n,
            "alternative": self.alternative,
        }
        if self.p_value_adjusted is not None:
            out["p_value_adjusted"] = self.p_value_adjusted
            out["correction"] = self.correction
        for k, v in self.details.items():
            out.setdefault(k, v)
        return _plain(out)


def make_result(
    test: str,
    statistic: Any,
    p_value: Any,
    effect_size: Any,
    effect_size_name: str,
    n: Any,
    alternative: str,
    batched: bool,
    correction: str | None,
    details: dict[str, Any],
) -> TestResult:
    """Build a :class:`TestResult`, adding Benjamini-Hochberg p-values for per-block tests."""
    p = _squeeze(p_value, batched)
    adjusted, corr = None, None
    if batched and correction is not None:
        if correction not in ("bh", "benjamini-hochberg"):
            raise InputValidationError(f"correction must be 'bh' or None, got {correction!r}")
        adjusted, corr = benjamini_hochberg(p), "benjamini-hochberg"
    return TestResult(
        test=test,
        statistic=_squeeze(statistic, batched),
        p_value=p,
        effect_size=_squeeze(effect_size, batched),
        effect_size_name=effect_size_name,
        n=_squeeze(np.asarray(n).astype(np.int64) if np.ndim(n) else int(n), batched),
        alternative=alternative,
        p_value_adjusted=adjusted,
        correction=corr,
        details={k: (_squeeze(v, batched) if isinstance(v, np.ndarray) else v) for k, v in details.items()},
    )


@dataclass(frozen=True)
class ConfidenceInterval:
    r"""A bootstrap confidence interval, or one per block (then (B,) arrays).

    Attributes:
        estimate: the statistic on the observed data (e.g. the mean).
        low, high: the interval's bounds.
        confidence_level: e.g. 0.95.
        method: ``"percentile"`` (the bootstrap method).
        statistic: what was estimated, e.g. ``"mean"`` or ``"ratio_of_sums"``.
        n: number of resampled units (images, classes ...).
        n_resamples: bootstrap resamples.
        seed: seed of the resampling (None: unseeded).
    """

    estimate: Any
    low: Any
    high: Any
    confidence_level: float
    method: str
    statistic: str
    n: int
    n_resamples: int
    seed: int | None

    @property
    def batched(self) -> bool:
        return np.ndim(self.estimate) == 1

    def block(self, index: int) -> ConfidenceInterval:
        """The interval of one block."""
        if not self.batched:
            raise InputValidationError("this interval is a single one; block() needs a per-block result")
        return replace(
            self,
            estimate=np.asarray(self.estimate)[index].item(),
            low=np.asarray(self.low)[index].item(),
            high=np.asarray(self.high)[index].item(),
        )

    def scaled(self, factor: float) -> ConfidenceInterval:
        """The interval of ``factor * statistic`` (e.g. 100 for percent)."""
        return replace(
            self,
            estimate=_squeeze(np.asarray(self.estimate) * factor, self.batched),
            low=_squeeze(np.asarray(self.low) * factor, self.batched),
            high=_squeeze(np.asarray(self.high) * factor, self.batched),
        )

    def to_dict(self) -> dict[str, Any]:
        r"""A JSON-ready dict: ``estimate``, ``ci_low``, ``ci_high``, ``confidence_level``,
        ``method``, ``statistic``, ``n``, ``n_resamples``, ``seed`` (NaN -> None)."""
        return _plain(
            {
                "estimate": self.estimate,
                "ci_low": self.low,
                "ci_high": self.high,
                "confidence_level": self.confidence_level,
                "method": f"{self.method} bootstrap",
                "statistic": self.statistic,
                "n": self.n,
                "n_resamples": self.n_resamples,
                "seed": self.seed,
            }
        )
