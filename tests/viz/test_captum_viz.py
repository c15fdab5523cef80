"""viz.captum: any map of the package as the arrays Captum's visualize_image_attr expects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import visualization as captum_viz
from matplotlib.figure import Figure

from captum_clsemb import load_demo_images, load_demo_model
from captum_clsemb.attr import ClassEmbeddingGradient, RawAttention
from captum_clsemb.demo import load_demo_config
from captum_clsemb.errors import InputValidationError
from captum_clsemb.viz import to_captum_arrays, visualize_image_attr, visualize_image_attr_multiple


@pytest.fixture(scope="module")
def setup():
    cfg = load_demo_config()
    x, y, _ = load_demo_images(max_per_class=1)
    x, y = x[:2], y[:2]
    maps = ClassEmbeddingGradient(load_demo_model()).attribute(x, target=y)  # (2, 1, 8, 8)
    return x, y, maps, cfg["mean"], cfg["std"]


def test_patch_grid_is_upsampled_to_the_image(setup) -> None:
    x, _, maps, mean, std = setup
    attr, img = to_captum_arrays(maps[0], x[0], mean=mean, std=std)
    assert attr.shape == (32, 32, 1) and img.shape == (32, 32, 3)
    want = F.interpolate(maps[:1].double(), size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(attr[..., 0], want.numpy(), rtol=1e-12)
    # the image: normalisation undone, channels last, in [0, 1]
    pixels = x[0].double() * torch.tensor(std, dtype=torch.float64)[:, None, None]
    pixels = pixels + torch.tensor(mean, dtype=torch.float64)[:, None, None]
    np.testing.assert_allclose(img, pixels.permute(1, 2, 0).clamp(0, 1).numpy(), atol=1e-6)
    # every form of one example's map gives the same arrays
    for form in (maps[0, 0], maps[0:1], (maps[0],), maps[0].numpy().transpose(1, 2, 0)):
        np.testing.assert_allclose(to_captum_arrays(form, x[0], mean=mean, std=std)[0], attr)


def test_input_shaped_and_full_size_maps(setup) -> None:
    x, y, maps, mean, std = setup
    full = ClassEmbeddingGradient(load_demo_model()).attribute(x, target=y, interpolate_to="input")
    attr, _ = to_captum_arrays(full[0], x[0], mean=mean, std=std)
    assert attr.shape == (32, 32, 3)  # Captum sums the channels: 3x the upsampled map
    up, _ = to_captum_arrays(maps[0], x[0], mean=mean, std=std)
    np.testing.assert_allclose(attr.sum(2), 3 * up[..., 0], rtol=1e-5, atol=1e-6)
    alone, none = to_captum_arrays(maps[0])
    assert none is None and alone.shape == (8, 8, 1)


def test_clear_error_instead_of_the_top_left_corner(setup) -> None:
    x, _, maps, mean, std = setup
    with pytest.raises(InputValidationError, match="top-left 8x8 pixels"):
        to_captum_arrays(maps[0], x[0], mean=mean, std=std, upsample=False)
    with pytest.raises(InputValidationError, match="64x64 but the image is 32x32"):
        to_captum_arrays(torch.zeros(1, 64, 64), x[0], mean=mean, std=std)
    with pytest.raises(InputValidationError, match="one at a time"):
        to_captum_arrays(maps, x[0], mean=mean, std=std)
    with pytest.raises(InputValidationError, match="select one map"):
        to_captum_arrays(torch.zeros(1, 2, 3, 8, 8), x[0], mean=mean, std=std)
    with pytest.raises(InputValidationError, match="mean= and std="):
        to_captum_arrays(maps[0], x[0])  # a normalised image is not in [0, 1]


def test_captum_draws_the_map_over_the_whole_image(setup) -> None:
    x, _, _, mean, std = setup
    maps = RawAttention(load_demo_model()).attribute(x)
    fig, ax = visualize_image_attr(maps[1], x[1], "blended_heat_map", "absolute_value", mean=mean, std=std)
    assert isinstance(fig, Figure)
    heat = ax.get_images()[-1]  # drawn on the image's 32x32 pixel grid, not on the top-left 8x8
    assert heat.get_array().shape == (32, 32)
    # the same figure as Captum's own function on the converted arrays
    attr, img = to_captum_arrays(maps[1], x[1], mean=mean, std=std)
    _, ref_ax = captum_viz.visualize_image_attr(
        attr, img, "blended_heat_map", "absolute_value", use_pyplot=False
    )
    np.testing.assert_allclose(heat.get_array(), ref_ax.get_images()[-1].get_array())
    fig, axes = visualize_image_attr_multiple(
        maps[1], x[1], ["original_image", "heat_map"], ["all", "positive"], mean=mean, std=std
    )
    assert len(axes) == 2 and isinstance(fig, Figure)
