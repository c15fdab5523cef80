"""The mechanism plots draw exactly the values they are given."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from captum_clsemb.errors import InputValidationError
from captum_clsemb.stats import wilcoxon_signed_rank
from captum_clsemb.viz.mechanisms import (
    plot_class_context,
    plot_class_similarity_change,
    plot_class_value_agreement,
    plot_identifiability_curves,
    plot_key_value_agreement,
    plot_residual_match,
)

B = 4
G = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=G, dtype=torch.float64)


def lines_by_label(fig: Figure) -> dict[str, np.ndarray]:
    return {
        ln.get_label(): np.asarray(ln.get_ydata())
        for ax in fig.axes
        for ln in ax.get_lines()
        if not ln.get_label().startswith("_")
    }


def test_identifiability_curves_with_baseline_and_summary() -> None:
    curves = {"cls": rand(B), "image": rand(B)}
    base = {"cls": rand(B), "image": rand(B)}
    fig = plot_identifiability_curves(curves, baseline=base)
    assert isinstance(fig, Figure)
    lines = lines_by_label(fig)
    np.testing.assert_allclose(lines["cls tokens"], curves["cls"].numpy())
    np.testing.assert_allclose(lines["image tokens (random init)"], base["image"].numpy())
    x = fig.axes[0].get_lines()[0].get_xdata()
    np.testing.assert_array_equal(x, np.arange(1, B + 1))
    summary = {"mean": curves, "rate": {"cls": 100 * rand(B), "image": 100 * rand(B)}}
    lines = lines_by_label(plot_identifiability_curves(summary, stat="rate"))
    np.testing.assert_allclose(lines["image tokens"], summary["rate"]["image"].numpy())


def test_class_context_and_change_rates() -> None:
    res = {"class": {"mean": rand(B), "rate": rand(B)}, "context": {"mean": rand(B), "rate": rand(B)}}
    lines = lines_by_label(plot_class_context(res, stat="rate"))
    np.testing.assert_allclose(lines["context-labelled tokens"], res["context"]["rate"].numpy())
    with pytest.raises(InputValidationError):
        plot_class_context(res, stat="median")
    rates = {
        "attn": {"cls": 100 * rand(B), "image": 100 * rand(B)},
        "mlp": {"cls": 100 * rand(B), "image": 100 * rand(B)},
    }
    fig = plot_class_similarity_change(rates)
    lines = lines_by_label(fig)
    assert len(lines) == 5
    np.testing.assert_allclose(lines["mlp, image tokens"], rates["mlp"]["image"].numpy())
    np.testing.assert_allclose(lines["chance (50%)"], [50.0, 50.0])


def band_edges(ax) -> list[tuple[np.ndarray, np.ndarray]]:
    """(lower, upper) edges of every shaded band (fill_between) of an axes."""
    out = []
    for coll in ax.collections:
        if isinstance(coll, PolyCollection):
            v = coll.get_paths()[0].vertices
            # fill_between's polygon: a start point, the lower edge, the upper edge backwards, closing points
            n = (len(v) - 3) // 2
            out.append((v[1 : n + 1, 1], v[n + 2 : 2 * n + 2, 1][::-1]))
    return out


def test_confidence_bands_baselines_and_stars() -> None:
    # class similarity change with bands: exactly the given (low, high)
    rates = {"attn": {"image": 100 * rand(B)}}
    low, high = rates["attn"]["image"] - 5, rates["attn"]["image"] + 7
    fig = plot_class_similarity_change(rates, ci={"attn": {"image": (low, high)}})
    ((lo, hi),) = band_edges(fig.axes[0])
    np.testing.assert_allclose(lo, low.numpy())
    np.testing.assert_allclose(hi, high.numpy())
    # key-value agreement: bands, and the chance baseline as its own line
    kva = {"mlp": {"image": 100 * rand(B), "cls": 100 * rand(B)}}
    base = {"mlp": {"image": 100 * rand(B)}}
    fig = plot_key_value_agreement(kva, ci={"mlp": {"image": (kva["mlp"]["image"] - 1, kva["mlp"]["image"] + 1)}},
                                   baseline=base, baseline_label="chance")  # fmt: skip
    lines = lines_by_label(fig)
    np.testing.assert_allclose(lines["mlp, image tokens: chance"], base["mlp"]["image"].numpy())
    assert len(band_edges(fig.axes[0])) == 1
    # class-value agreement: a star above exactly the significant blocks
    trained = {"mlp": 0.5 + rand(B, 12)}
    random = {"mlp": rand(B, 12)}
    test = wilcoxon_signed_rank(trained["mlp"].T.numpy(), random["mlp"].T.numpy() + np.array([0, 0, 1, 1]))
    assert test.significant(0.05).tolist() == [True, True, False, False]
    fig = plot_class_value_agreement(trained, random, tests={"mlp": test})
    stars = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "*"]
    assert len(stars) == 1 and stars[0].get_xdata().tolist() == [1, 2]
    # class vs context: bands for both groups, stars where the test rejects
    res = {"class": rand(B) + 1, "context": rand(B)}
    alternating = np.resize([0.01, -0.01], 10)[:, None]  # no shift: not significant
    test = wilcoxon_signed_rank(np.hstack([1.0 + rand(10, 2).numpy(), np.repeat(alternating, 2, 1)]))
    ci = {g: (v - 0.1, v + 0.1) for g, v in res.items()}
    fig = plot_class_context(res, ci=ci, test=test)
    assert len(band_edges(fig.axes[0])) == 2
    stars = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "*"]
    assert stars[0].get_xdata().tolist() == [1, 2]
    np.testing.assert_allclose(stars[0].get_ydata(), res["class"][:2].numpy())


def test_residual_match_error_bars_at_segment_tops() -> None:
    shares = {
        c: torch.full((B,), 25.0, dtype=torch.float64) for c in ("attn", "mlp", "residual", "composite")
    }
    ci = {c: (v - 2.0, v + 3.0) for c, v in shares.items()}
    fig = plot_residual_match(shares, ci=ci)
    bars = fig.axes[0].containers
    errs = [c for c in bars if c.__class__.__name__ == "ErrorbarContainer"]
    assert len(errs) == 4
    segs = errs[1].lines[2][0].get_segments()  # mlp: the second category, top edge at 50%
    np.testing.assert_allclose([s[0][1] for s in segs], 48.0)
    np.testing.assert_allclose([s[1][1] for s in segs], 53.0)


def test_residual_match_bars_stack_to_totals() -> None:
    shares = rand(4, B)
    shares = 100 * shares / shares.sum(0)
    match = {"all": dict(zip(("attn", "mlp", "residual", "composite"), shares)), "cls": {}}
    fig = plot_residual_match(match, group="all")
    bars = fig.axes[0].patches
    assert len(bars) == 4 * B
    tops = np.zeros(B)
    for i, rect in enumerate(bars):
        tops[i % B] = max(tops[i % B], rect.get_y() + rect.get_height())
        np.testing.assert_allclose(rect.get_height(), shares[i // B, i % B].item())
    np.testing.assert_allclose(tops, 100.0)


def test_class_value_agreement_boxes_and_key_value_lines() -> None:
    trained = {"attn": rand(B, 10), "mlp": rand(B, 10)}
    random = {"attn": rand(B, 10), "mlp": rand(B, 10)}
    fig = plot_class_value_agreement(trained, random)
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["attn", "mlp"]
    medians = [ln for ln in fig.axes[1].get_lines() if ln.get_gid() == "median"]
    got = sorted(float(ln.get_ydata()[0]) for ln in medians)
    want = sorted(
        np.median(trained["mlp"].numpy(), 1).tolist() + np.median(random["mlp"].numpy(), 1).tolist()
    )
    np.testing.assert_allclose(got, want)
    assert len(plot_class_value_agreement(trained["mlp"]).axes) == 1
    rates = {
        layer: {
            k: 100 * rand(B)
            for k in ("image", "cls", "image_correct", "image_incorrect", "cls_correct", "cls_incorrect")
        }
        for layer in ("attn", "mlp")
    }
    lines = lines_by_label(plot_key_value_agreement(rates))
    assert set(lines) == {"attn, image tokens", "attn, class token", "mlp, image tokens", "mlp, class token"}
    np.testing.assert_allclose(lines["attn, class token"], rates["attn"]["cls"].numpy())
    lines = lines_by_label(plot_key_value_agreement(rates, groups=("image",), split=True))
    np.testing.assert_allclose(
        lines["mlp, image tokens, misclassified"], rates["mlp"]["image_incorrect"].numpy()
    )
