"""The identifiability figures draw exactly the values they are given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captum_clsemb.errors import InputValidationError
from captum_clsemb.viz import identifiability, mechanisms
from captum_clsemb.viz.identifiability import plot_identifiability_curves, plot_token_maps


def lines_by_label(fig) -> dict[str, np.ndarray]:
    return {ln.get_label(): np.asarray(ln.get_ydata()) for ax in fig.axes for ln in ax.get_lines()}


def test_one_function_for_fig2() -> None:
    # the report and the mechanism plots use the same function, not two of the same name
    assert mechanisms.plot_identifiability_curves is identifiability.plot_identifiability_curves


def test_curves_chance_and_condition_names() -> None:
    g = torch.Generator().manual_seed(1)
    curves = {"cls": torch.rand(5, generator=g), "image": torch.rand(5, generator=g)}
    fig = plot_identifiability_curves(curves, chance=0.55, title="t")
    lines = lines_by_label(fig)
    np.testing.assert_allclose(lines["cls tokens"], curves["cls"].numpy())
    np.testing.assert_allclose(lines["image tokens"], curves["image"].numpy())
    np.testing.assert_allclose(lines["chance"], [0.55, 0.55])
    np.testing.assert_array_equal(fig.axes[0].get_lines()[0].get_xdata(), np.arange(1, 6))
    assert fig.axes[0].get_title() == "t"
    # names that are not token groups (conditions of an intervention) are kept as they are
    lines = lines_by_label(plot_identifiability_curves({"unperturbed": [0.5, 0.7], "self only": [0.5, 0.6]}))
    np.testing.assert_allclose(lines["self only"], [0.5, 0.6])
    with pytest.raises(InputValidationError, match="stat"):
        plot_identifiability_curves(curves, stat="median")


def test_token_maps_show_scores_on_one_absolute_scale() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(2, 3, 1 + 16, generator=g)  # (N, blocks, 1 + 4x4 tokens)
    images = torch.rand(2, 3, 16, 16, generator=g)
    fig = plot_token_maps(scores, images, grid=(4, 4), num_prefix_tokens=1, blocks=[0, 2])
    shown = [ax.get_images()[-1] for ax in fig.axes if len(ax.get_images()) == 2]
    assert len(shown) == 4
    k = 0
    for i in range(2):
        for b in (0, 2):
            # nearest upsampling of the 4x4 grid to 16x16, not rescaled: the same 0..1 scale in every panel
            up = np.kron(scores[i, b, 1:].view(4, 4).numpy(), np.ones((4, 4)))
            np.testing.assert_allclose(np.asarray(shown[k].get_array()), up, rtol=1e-6)
            assert shown[k].get_clim() == (0.0, 1.0)
            k += 1
    # one colour bar for all panels, from 0 to 1, saying what r is
    cbar = fig.axes[-1]
    assert cbar.get_ylim() == (0.0, 1.0) and "r = 1 - rank/|C|" in cbar.get_ylabel()
    with pytest.raises(InputValidationError, match="scale"):
        plot_token_maps(scores, images, grid=(4, 4), num_prefix_tokens=1, blocks=[0], scale="global")


def test_token_maps_scaled_per_panel_by_captum() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(2, 3, 1 + 16, generator=g)  # (N, blocks, 1 + 4x4 tokens)
    images = torch.rand(2, 3, 16, 16, generator=g)
    fig = plot_token_maps(scores, images, grid=(4, 4), num_prefix_tokens=1, blocks=[0, 2], scale="panel")
    # blended_heat_map draws the grayscale image first, then the heat map on top
    shown = [np.asarray(ax.get_images()[-1].get_array()) for ax in fig.axes if len(ax.get_images()) == 2]
    # nearest upsampling of the 4x4 grid to 16x16, scaled by its maximum (outlier_perc=0), row by row
    expected = []
    for i in range(2):
        for b in (0, 2):
            up = np.kron(scores[i, b, 1:].view(4, 4).numpy(), np.ones((4, 4)))
            expected.append(up / up.max())
    assert len(shown) == len(expected)
    for got, exp in zip(shown, expected):
        np.testing.assert_allclose(got, exp, rtol=1e-6)
