"""The several-models figure draws the curves, bands, baselines and stars it is given."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from captum_clsemb.analysis.model_comparison import IdentifiabilityRecord, compare_models
from captum_clsemb.errors import InputValidationError
from captum_clsemb.stats import bootstrap_ci, wilcoxon_signed_rank
from captum_clsemb.viz.models import plot_model_comparison, plot_model_curves


def record(name: str, blocks: int, level: float, seed: int) -> IdentifiabilityRecord:
    rng = np.random.default_rng(seed)
    n = 30
    mean = np.clip(0.5 + level * np.linspace(0, 1, blocks) + 0.05 * rng.normal(size=(n, blocks)), 0, 1)
    return IdentifiabilityRecord(
        name=name,
        num_classes=10,
        image_mean=mean,
        image_rate=100 * mean**4,
        cls_score=mean,
        any_identifiable=rng.random(n) < 0.9,
        correct=rng.random(n) < 0.8,
        labelled=np.ones(n, dtype=bool),
    )


def test_curves_bands_baselines_and_stars() -> None:
    x = np.array([0.25, 0.5, 0.75, 1.0])
    per = {"m": np.random.default_rng(0).uniform(0.4, 0.9, size=(20, 4))}
    curves = {"m": {"image": per["m"].mean(0)}}
    ci = {"m": {"image": bootstrap_ci(per["m"], n_resamples=200)}}
    base = {"m": {"image": np.full(4, 0.5)}}
    test = wilcoxon_signed_rank(per["m"], np.full((20, 4), 0.5) + np.array([0.6, 0.0, 0.0, 0.6]))
    fig = plot_model_curves(curves, depth=x, ci=ci, baselines=base, tests={"m": {"image": test}}, title="t")
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    np.testing.assert_allclose(lines["m, image tokens"].get_ydata(), curves["m"]["image"])
    np.testing.assert_allclose(lines["m, image tokens"].get_xdata(), x)
    np.testing.assert_allclose(lines["m, image tokens (random init)"].get_ydata(), 0.5)
    stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*" and len(ln.get_xdata())]
    sig = test.significant(0.05)
    assert sig.tolist() == [False, True, True, False]
    assert len(stars) == 1 and np.allclose(stars[0].get_xdata(), x[sig])
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 1
    assert ax.get_title() == "t" and ax.get_xlim()[0] == 0
    with pytest.raises(InputValidationError, match="depth positions"):
        plot_model_curves(curves, depth=x[:3])


def test_plot_model_comparison_on_a_comparison() -> None:
    recs = [record("B/16", 12, 0.4, 1), record("L/16", 24, 0.45, 2)]
    rnd = record("random", 12, 0.0, 3)
    cmp = compare_models(recs, baselines={"B/16": rnd}, n_resamples=200)
    fig = plot_model_comparison(cmp)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert {
        "B/16, image tokens",
        "B/16, class token",
        "L/16, image tokens",
        "B/16, image tokens (random init)",
    } <= set(lines)
    np.testing.assert_allclose(lines["L/16, image tokens"].get_ydata(), cmp.curves["L/16"]["mean"]["image"])
    assert len(lines["L/16, image tokens"].get_xdata()) == 12
    stars = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "*" and len(ln.get_xdata())]
    expected = sum(int(t.significant(0.05).sum()) > 0 for t in cmp.tests["B/16"].values())
    assert len(stars) == expected > 0
    rate = plot_model_comparison(cmp, stat="rate", groups=("image",), show_ci=False)
    ylab = rate.axes[0].get_ylabel()
    assert "rate" in ylab and not any(
        ln.get_marker() == "*" and len(ln.get_xdata()) for ln in rate.axes[0].get_lines()
    )
    with pytest.raises(InputValidationError, match="stat"):
        plot_model_comparison(cmp, stat="median")
