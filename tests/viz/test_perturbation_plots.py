"""The perturbation-curve figure draws the mean curves, bands and AUC intervals it is given."""

from __future__ import annotations

import numpy as np
import torch

from captum_clsemb.metrics.compare import ComparisonResults
from captum_clsemb.stats import bootstrap_ci
from captum_clsemb.viz.perturbation import plot_perturbation_curves


def results() -> ComparisonResults:
    g = torch.Generator().manual_seed(0)
    fr = torch.linspace(0, 0.9, 10)
    curves = {m: {mode: (torch.rand(8, 10, generator=g) > 0.4).float() for mode in ("negative", "positive")}
              for m in ("A", "B")}  # fmt: skip
    return ComparisonResults(
        ["A", "B"], fr, curves, 0.6, {"A": 0.1, "B": 0.2}, 8, "accuracy", "tokens", "label"
    )


def test_curves_bands_and_auc_intervals_in_the_legend() -> None:
    res = results()
    ci = {m: {mode: bootstrap_ci(res.curves[m][mode].double().numpy(), n_resamples=200) for mode in res.curves[m]}
          for m in res.methods}  # fmt: skip
    aucs = {m: {"negative": bootstrap_ci(np.arange(8.0), n_resamples=200)} for m in res.methods}
    fig = plot_perturbation_curves(res, ci=ci, aucs=aucs)
    left, right = fig.axes
    lines = {ln.get_label(): ln for ln in left.get_lines()}
    label = next(k for k in lines if k.startswith("A ("))
    a = aucs["A"]["negative"]
    assert label == f"A ({a.estimate:.1f} [{a.low:.1f}, {a.high:.1f}])"
    np.testing.assert_allclose(lines[label].get_ydata(), res.mean_curve("A", "negative").numpy())
    np.testing.assert_allclose(lines[label].get_xdata(), np.linspace(0, 90, 10), atol=1e-5)
    assert len(left.collections) == 2 and len(right.collections) == 2  # one band per method
    # without intervals: the mean trapezoid AUC in the legend, no bands
    plain = plot_perturbation_curves(res)
    assert f"B ({res.auc('B', 'positive'):.1f})" in [ln.get_label() for ln in plain.axes[1].get_lines()]
    assert not plain.axes[0].collections
