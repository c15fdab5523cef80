"""Explanation figures: layout, and every panel drawn from the upsampled map by Captum."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import images, small_timm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from captum_clsemb import InputValidationError  # noqa: E402
from captum_clsemb.attr.class_embedding_gradient import ClassEmbeddingGradient  # noqa: E402
from captum_clsemb.viz import explanations  # noqa: E402
from captum_clsemb.viz.explanations import plot_block_head_grid, plot_global_map  # noqa: E402


def colorbar_axes(fig: Figure):
    """The colour bar: the last axes, labelled with the per-panel normalisation."""
    return fig.axes[-1]


def colorbar_range(fig: Figure) -> tuple[float, float]:
    cax = colorbar_axes(fig)
    return cax.get_ylim()


def test_block_head_grid_layout_and_captum_panels(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_timm()
    x = images(1)
    maps = ClassEmbeddingGradient(model).attribute(x, target=2, return_per="head")[0]  # (3, 4, 4, 4)
    image = (x[0] - x[0].min()) / (x[0].max() - x[0].min())
    calls = []
    real = explanations.captum_viz.visualize_image_attr
    monkeypatch.setattr(
        explanations.captum_viz,
        "visualize_image_attr",
        lambda attr, *a, **k: calls.append((attr, k)) or real(attr, *a, **k),
    )
    fig = plot_block_head_grid(maps, image, title="t")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3 * 4 + 1  # the panels, then one colour bar for all of them
    # signed maps: Captum's red-white-green map over [-1, 1], and the per-panel normalisation is stated
    assert colorbar_range(fig) == (-1.0, 1.0)
    label = colorbar_axes(fig).get_ylabel()
    assert "98%" in label and "clipped to [-1, 1]" in label
    assert len(calls) == 12 and all(k["use_pyplot"] is False for _, k in calls)
    # Each panel gets the bilinearly upsampled map of its block and head, at image size.
    up = torch.nn.functional.interpolate(maps.double(), size=(32, 32), mode="bilinear")
    np.testing.assert_allclose(calls[1 * 4 + 2][0][..., 0], up[1, 2].numpy(), atol=1e-12)
    assert calls[5][1]["plt_fig_axis"] == (fig, fig.axes[5])
    assert fig.axes[4].get_ylabel() == "block 1" and fig.axes[2].get_title() == "head 2"
    assert len(plot_block_head_grid(maps, image, colorbar=False).axes) == 3 * 4


def test_grid_from_block_maps_numpy_image_and_zero_panel() -> None:
    maps = np.random.default_rng(0).normal(size=(3, 4, 4))
    maps[1] = np.abs(maps[1])  # no negative values in block 1
    img = np.random.default_rng(1).uniform(size=(16, 16, 3))
    fig = plot_block_head_grid(maps, img, blocks=[9, 10, 11], sign="negative", outlier_perc=5)
    assert len(fig.axes) == 3 + 1 and fig.axes[0].get_ylabel() == "block 9"
    assert colorbar_range(fig) == (0.0, 1.0) and "95%" in colorbar_axes(fig).get_ylabel()
    # masks and alpha scaling have no colour map: no colour bar
    assert len(plot_block_head_grid(np.abs(maps), img, method="alpha_scaling", sign="positive").axes) == 3
    assert "no negative values" in fig.axes[1].get_title()


def test_global_map() -> None:
    model = small_timm()
    x = images(1)
    glob = ClassEmbeddingGradient(model).attribute(x, target=0)[0]  # (1, 4, 4)
    image = torch.rand(3, 32, 32)
    fig = plot_global_map(glob, image, title="global")
    assert isinstance(fig, Figure) and len(fig.axes) == 2 + 1
    assert fig.axes[1].get_title() == "global" and colorbar_range(fig) == (-1.0, 1.0)
    assert len(plot_global_map(glob[0].numpy(), image, show_image=False, colorbar=False).axes) == 1
    normalised = (image - 0.5) / 0.5
    assert len(plot_global_map(glob, normalised, mean=(0.5,) * 3, std=(0.5,) * 3).axes) == 2 + 1


def test_plot_errors() -> None:
    with pytest.raises(InputValidationError, match="in \\[0, 1\\]"):
        plot_global_map(torch.rand(4, 4), torch.randn(3, 8, 8) * 3)
    with pytest.raises(InputValidationError, match="num_blocks, num_heads"):
        plot_block_head_grid(torch.rand(2, 3, 2, 4, 4), torch.rand(3, 8, 8))
    with pytest.raises(InputValidationError, match="labels"):
        plot_block_head_grid(torch.rand(2, 3, 4, 4), torch.rand(3, 8, 8), heads=[0, 1])
    with pytest.raises(InputValidationError, match="sign"):
        plot_global_map(torch.rand(4, 4), torch.rand(3, 8, 8), sign="both")
