"""Percentile bootstrap intervals against scipy.stats.bootstrap, and their coverage on simulated data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as st

from captum_clsemb import InputValidationError
from captum_clsemb.stats import bootstrap_ci, bootstrap_ratio_ci


def test_bootstrap_ci_equals_scipy_per_block() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(40, 3)) + np.array([0.0, 1.0, 5.0])
    ci = bootstrap_ci(v, n_resamples=999, seed=3)
    ref = st.bootstrap((v,), np.mean, axis=0, method="percentile", n_resamples=999, rng=3)
    np.testing.assert_allclose(ci.low, ref.confidence_interval.low)
    np.testing.assert_allclose(ci.high, ref.confidence_interval.high)
    np.testing.assert_allclose(ci.estimate, v.mean(0))
    for b in range(3):
        one = st.bootstrap((v[:, b],), np.mean, method="percentile", n_resamples=999, rng=3)
        assert ci.block(b).low == pytest.approx(one.confidence_interval.low)
    # reproducible with the seed; batching does not change it
    again = bootstrap_ci(v, n_resamples=999, seed=3, batch=50)
    np.testing.assert_array_equal(again.low, ci.low)
    other = bootstrap_ci(v, n_resamples=999, seed=4)
    assert not np.array_equal(other.low, ci.low)
    med = bootstrap_ci(v[:, 0], statistic="median", n_resamples=999, seed=1)
    ref = st.bootstrap((v[:, 0],), np.median, method="percentile", n_resamples=999, rng=1)
    assert med.low == pytest.approx(ref.confidence_interval.low) and med.estimate == pytest.approx(
        np.median(v[:, 0])
    )


def test_bootstrap_closed_forms() -> None:
    # constant data: every resample has the same mean
    ci = bootstrap_ci(np.full(10, 0.7), n_resamples=200)
    assert ci.low == pytest.approx(0.7) and ci.high == pytest.approx(0.7)
    # two values 0 and 1: resampled means are k/2 with k ~ Binomial(2, 1/2); the 2.5% and
    # 97.5% percentiles are 0 and 1 for any large number of resamples
    ci = bootstrap_ci(np.array([0.0, 1.0]), n_resamples=4000, seed=0)
    assert ci.low == 0.0 and ci.high == 1.0
    # a single unit: no interval
    one = bootstrap_ci(np.array([[0.3, 0.4]]))
    assert np.isnan(one.low).all() and one.estimate.tolist() == [0.3, 0.4]
    # percent scale
    pct = bootstrap_ci(np.array([0.0, 1.0, 1.0, 1.0]), n_resamples=500).scaled(100)
    assert pct.estimate == 75.0 and 0 <= pct.low <= 75 <= pct.high <= 100


def test_bootstrap_coverage_of_the_true_mean() -> None:
    # 200 simulated data sets of 40 exponential values (skewed, true mean 2): the 95%
    # percentile interval should cover 2 in about 95% of them (percentile intervals run a
    # little short on skewed small samples)
    rng = np.random.default_rng(12345)
    hits = 0
    for i in range(200):
        v = rng.exponential(2.0, size=40)
        ci = bootstrap_ci(v, n_resamples=999, seed=i)
        hits += ci.low <= 2.0 <= ci.high
    coverage = hits / 200
    print(f"bootstrap coverage: {coverage:.3f}")
    assert 0.90 <= coverage <= 0.99


def test_bootstrap_coverage_of_a_rate_over_images() -> None:
    # per-image identifiability rates: images with 49 tokens, each identifiable with p_i ~ Beta(3, 2)
    # (true mean rate 0.6); one interval per "block" = per simulated data set, one call
    rng = np.random.default_rng(7)
    sims = 200
    rates = rng.binomial(49, rng.beta(3, 2, size=(60, sims))) / 49  # (images, sims)
    ci = bootstrap_ci(rates, n_resamples=999, seed=0)
    coverage = np.mean((ci.low <= 0.6) & (0.6 <= ci.high))
    print(f"rate coverage: {coverage:.3f}")
    assert 0.90 <= coverage <= 0.99


def test_ratio_ci_equals_scipy_paired() -> None:
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 20, size=(30, 2)).astype(float)
    sums = counts * rng.uniform(0.3, 0.9, size=(30, 2))
    ci = bootstrap_ratio_ci(sums, counts, n_resamples=999, seed=5)
    ref = st.bootstrap(
        (sums, counts),
        lambda a, c, axis: a.sum(axis) / c.sum(axis),
        paired=True,
        axis=0,
        method="percentile",
        n_resamples=999,
        rng=5,
    )
    np.testing.assert_allclose(ci.low, ref.confidence_interval.low)
    np.testing.assert_allclose(ci.high, ref.confidence_interval.high)
    np.testing.assert_allclose(ci.estimate, sums.sum(0) / counts.sum(0))
    assert ci.statistic == "ratio_of_sums" and ci.n == 30


def test_to_dict_and_errors() -> None:
    d = bootstrap_ci(np.arange(10.0), n_resamples=100, seed=2).to_dict()
    assert set(d) >= {"estimate", "ci_low", "ci_high", "confidence_level", "method", "n", "seed"}
    assert d["method"] == "percentile bootstrap" and d["confidence_level"] == 0.95
    json.dumps(bootstrap_ci(np.array([[1.0, 2.0]])).to_dict(), allow_nan=False)  # NaN bounds -> null
    assert math.isnan(bootstrap_ci(np.array([1.0])).low)
    with pytest.raises(InputValidationError, match="confidence_level"):
        bootstrap_ci(np.arange(5.0), confidence_level=95)
    with pytest.raises(InputValidationError, match="statistic"):
        bootstrap_ci(np.arange(5.0), statistic="mode")
    with pytest.raises(InputValidationError, match="same shape"):
        bootstrap_ratio_ci(np.ones(3), np.ones(4))
    with pytest.raises(InputValidationError, match="NaN"):
        bootstrap_ci(np.array([1.0, np.nan]))
