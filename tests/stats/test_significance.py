"""Significance tests against the direct scipy.stats calls and against closed forms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as st

from captum_clsemb import InputValidationError
from captum_clsemb.stats import (
    TestResult,
    benjamini_hochberg,
    mann_whitney_u,
    paired_auc_test,
    permutation_test,
    perturbation_auc_tests,
    significance_stars,
    wilcoxon_signed_rank,
)


def data(n: int = 25, blocks: int = 4, seed: int = 0, shift: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, blocks)) + shift * np.arange(blocks)
    y = rng.normal(size=(n, blocks))
    return x, y


# -- Wilcoxon signed-rank ------------------------------------------------------------------
@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_wilcoxon_equals_scipy_per_block(alternative: str) -> None:
    x, y = data()
    res = wilcoxon_signed_rank(x, y, alternative=alternative)
    assert res.batched and len(res) == 4 and res.test == "wilcoxon_signed_rank"
    for b in range(4):
        ref = st.wilcoxon(x[:, b], y[:, b], alternative=alternative)
        assert res.statistic[b] == ref.statistic
        assert res.p_value[b] == pytest.approx(ref.pvalue, rel=1e-12)
        one = res.block(b)
        assert one.p_value == pytest.approx(ref.pvalue, rel=1e-12) and one.n == 25
    np.testing.assert_allclose(res.p_value_adjusted, st.false_discovery_control(res.p_value, method="bh"))
    # torch tensors and a single block give the same numbers
    single = wilcoxon_signed_rank(torch.tensor(x[:, 2]), torch.tensor(y[:, 2]), alternative=alternative)
    assert not single.batched and single.p_value_adjusted is None
    assert single.p_value == pytest.approx(res.p_value[2], rel=1e-12)


def test_wilcoxon_closed_forms() -> None:
    # 8 positive differences: exact one-sided p = 1 / 2^8, rank-biserial 1
    d = np.arange(1.0, 9.0)
    res = wilcoxon_signed_rank(d)
    assert res.p_value == pytest.approx(1 / 256) and res.effect_size == 1.0 and res.statistic == 36.0
    # d = [1, -2, 3, 4]: ranks 1..4, R+ = 8, R- = 2 -> r = (8 - 2) / 10
    assert wilcoxon_signed_rank(np.array([1.0, -2, 3, 4])).effect_size == pytest.approx(0.6)
    # a zero difference is dropped (zero_method="wilcox"): same r, n = 4 of 5 pairs
    res = wilcoxon_signed_rank(np.array([0.0, 1, -2, 3, 4]))
    assert res.effect_size == pytest.approx(0.6) and res.n == 4 and res.details["n_pairs"] == 5
    # exact p of R+ = 8 with n = 4: subsets of {1,2,3,4} with sum >= 8 are {1,3,4}, {2,3,4}, {1,2,3,4}
    assert res.p_value == pytest.approx(3 / 16)
    # a block with only zero differences: untestable, p = 1, effect undefined
    both = wilcoxon_signed_rank(np.zeros((6, 2)), np.c_[np.zeros(6), -np.ones(6)])
    assert both.p_value[0] == 1.0 and math.isnan(both.effect_size[0]) and both.n[0] == 0
    assert both.p_value[1] == pytest.approx(1 / 64) and both.effect_size[1] == 1.0


def test_paired_auc_test_direction() -> None:
    rng = np.random.default_rng(3)
    base = rng.uniform(40, 60, size=30)
    better = base + rng.normal(2.0, 1.0, size=30)
    neg = paired_auc_test(better, base, mode="negative")
    ref = st.wilcoxon(better, base, alternative="greater")
    assert neg.p_value == pytest.approx(ref.pvalue) and neg.alternative == "greater" and neg.p_value < 0.001
    # positive mode: lower is better -> the same data is not better
    pos = paired_auc_test(better, base, mode="positive")
    assert pos.alternative == "less" and pos.p_value == pytest.approx(
        st.wilcoxon(better, base, alternative="less").pvalue
    )
    assert pos.p_value > 0.99 and pos.details["mode"] == "positive"
    aucs = {
        "ClassEmbeddingGradient": {"negative": better, "positive": base - 3},
        "Random": {"negative": base, "positive": base},
        "LinearProbe": {"negative": base + 1, "positive": base + 1},
    }
    tests = perturbation_auc_tests(aucs)
    assert set(tests) == {"negative", "positive"} and set(tests["negative"]) == {"Random", "LinearProbe"}
    assert tests["positive"]["Random"].p_value == pytest.approx(
        st.wilcoxon(base - 3, base, alternative="less").pvalue
    )
    with pytest.raises(InputValidationError, match="mode"):
        paired_auc_test(better, base, mode="both")


# -- Mann-Whitney U ---------------------------------------------------------------------------
@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_mann_whitney_equals_scipy(alternative: str) -> None:
    x, _ = data(n=20, seed=1)
    _, y = data(n=13, seed=2)
    res = mann_whitney_u(x, y, alternative=alternative)
    for b in range(4):
        ref = st.mannwhitneyu(x[:, b], y[:, b], alternative=alternative)
        assert res.statistic[b] == ref.statistic
        assert res.p_value[b] == pytest.approx(ref.pvalue, rel=1e-12)
        assert res.effect_size[b] == pytest.approx(2 * ref.statistic / (20 * 13) - 1)
    assert res.n == 33 and res.details["n_x"] == 20 and res.details["n_y"] == 13


def test_mann_whitney_closed_forms() -> None:
    # every x above every y: U = 9, r = 1, exact one-sided p = 1 / C(6, 3)
    res = mann_whitney_u(np.array([4.0, 5, 6]), np.array([1.0, 2, 3]), method="exact")
    assert res.statistic == 9 and res.effect_size == 1.0 and res.p_value == pytest.approx(1 / 20)
    # binary agreement (ties): x = [1, 1, 0], y = [0, 0]: U = 2*2 + 1*2*0.5 = 5 of 6
    res = mann_whitney_u(np.array([1.0, 1, 0]), np.array([0.0, 0]))
    assert res.statistic == 5 and res.details["prob_superiority"] == pytest.approx(5 / 6)
    with pytest.raises(InputValidationError, match="at least one sample"):
        mann_whitney_u(np.ones((3, 2)), np.ones((0, 2)))


# -- permutation test ----------------------------------------------------------------------------
def _diff(a, b, axis):
    return a.mean(axis) - b.mean(axis)


@pytest.mark.parametrize("alternative", ["greater", "two-sided"])
def test_permutation_equals_scipy(alternative: str) -> None:
    x, _ = data(n=30, seed=4, shift=0.2)
    _, y = data(n=45, seed=5)
    res = permutation_test(x, y, alternative=alternative, n_resamples=499, seed=7)
    ref = st.permutation_test(
        (x, y), _diff, vectorized=True, n_resamples=499, alternative=alternative, axis=0, rng=7
    )
    np.testing.assert_allclose(res.statistic, ref.statistic)
    np.testing.assert_array_equal(res.p_value, ref.pvalue)
    # one block at a time, same seed: the same permutations, the same p-values
    for b in range(4):
        one = st.permutation_test(
            (x[:, b], y[:, b]), _diff, vectorized=True, n_resamples=499, alternative=alternative, rng=7
        )
        assert res.p_value[b] == one.pvalue
    # reproducible; memory-bounded batches do not change the result
    again = permutation_test(x, y, alternative=alternative, n_resamples=499, seed=7, batch=37)
    np.testing.assert_array_equal(again.p_value, res.p_value)
    assert res.details["n_resamples"] == 499 and res.details["seed"] == 7 and not res.details["exact"]


def test_permutation_paired_equals_scipy_samples() -> None:
    x, y = data(n=12, seed=6, shift=0.3)
    res = permutation_test(x, y, paired=True, n_resamples=999, seed=1)
    ref = st.permutation_test(
        (x, y),
        lambda a, b, axis: (a - b).mean(axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=999,
        alternative="greater",
        axis=0,
        rng=1,
    )
    np.testing.assert_array_equal(res.p_value, ref.pvalue)
    d = x - y
    np.testing.assert_allclose(res.effect_size, d.mean(0) / d.std(0, ddof=1))


def test_permutation_closed_forms() -> None:
    # x = [3, 4], y = [1, 2]: of the C(4, 2) = 6 splits only the observed one reaches mean difference 2
    res = permutation_test(np.array([3.0, 4]), np.array([1.0, 2]), n_resamples=1000)
    assert res.statistic == 2.0 and res.p_value == pytest.approx(1 / 6) and res.details["exact"]
    # Cohen's d with the pooled sd: both variances 0.5 -> d = 2 / sqrt(0.5)
    assert res.effect_size == pytest.approx(2 / math.sqrt(0.5))
    # paired, 3 positive differences: 2^3 sign patterns, only the observed one is as large
    res = permutation_test(np.array([2.0, 4, 6]), np.array([1.0, 2, 3]), paired=True, n_resamples=100)
    assert res.p_value == pytest.approx(1 / 8) and res.statistic == pytest.approx(2.0)


# -- multiple testing and reporting ------------------------------------------------------------------
def test_benjamini_hochberg_closed_form_and_nan() -> None:
    # sorted p (0.01, 0.03, 0.04, 0.5) * 4 / rank = (0.04, 0.06, 0.0533, 0.5), then cumulative min from the top
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.04, 0.03, 0.5]), [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    out = benjamini_hochberg([0.01, float("nan"), 0.02])
    np.testing.assert_allclose(out, [0.02, np.nan, 0.02])  # two tests, not three
    with pytest.raises(InputValidationError, match="1-D"):
        benjamini_hochberg(np.zeros((2, 2)))


def test_stars_significance_and_json() -> None:
    assert significance_stars([0.2, 0.04, 0.009, 0.0001, float("nan")]) == ["", "*", "**", "***", ""]
    assert significance_stars(0.03, levels=(0.05,)) == "*"
    x, y = data(n=15)
    res = wilcoxon_signed_rank(x, y)
    np.testing.assert_array_equal(res.significant(0.05), res.p_value_adjusted <= 0.05)
    np.testing.assert_array_equal(res.significant(0.05, adjusted=False), res.p_value < 0.05)
    d = res.to_dict()
    for key in ("test", "statistic", "p_value", "effect_size", "n", "alternative", "p_value_adjusted"):
        assert key in d
    assert d["p_value"] == pytest.approx(res.p_value.tolist()) and isinstance(d["n"], list)
    json.dumps(d, allow_nan=False)
    # undefined numbers become null
    nan = wilcoxon_signed_rank(np.zeros((4, 2)), np.c_[np.zeros(4), np.ones(4)]).to_dict()
    assert nan["effect_size"][0] is None
    json.dumps(nan, allow_nan=False)
    assert TestResult.__test__ is False


def test_input_errors() -> None:
    with pytest.raises(InputValidationError, match="equal shapes"):
        wilcoxon_signed_rank(np.ones((4, 2)), np.ones((5, 2)))
    with pytest.raises(InputValidationError, match="NaN"):
        wilcoxon_signed_rank(np.array([1.0, np.nan]))
    with pytest.raises(InputValidationError, match="alternative"):
        mann_whitney_u(np.ones(3), np.ones(3), alternative="bigger")
    with pytest.raises(InputValidationError, match="blocks"):
        permutation_test(np.ones((3, 2)), np.ones((3, 3)))
    with pytest.raises(InputValidationError, match="seed"):
        permutation_test(np.ones(3), np.ones(3), seed=-1)
    with pytest.raises(InputValidationError, match=r"\(N, blocks\)"):
        wilcoxon_signed_rank(np.ones((2, 2, 2)))
