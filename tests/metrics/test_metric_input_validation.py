"""Metrics refuse NaN/inf images (naming them), empty batches and bad batch sizes with one package error.

Before, a NaN image scored a perfect token-removal AUC and any pixel-removal value silently.
"""

from __future__ import annotations

import pytest
import torch
from conftest import images, small_timm

from captum_clsemb.errors import InputValidationError, NonFiniteInputError
from captum_clsemb.metrics import (
    LinearProbeRanking,
    RandomRanking,
    compare_explanations,
    pixel_removal_auc,
    token_removal_auc,
)

FR = (0.0, 0.5)


def _bad_images(n: int = 4) -> torch.Tensor:
    x = images(n)
    x[2] = float("nan")
    return x


def _grid_maps(n: int) -> torch.Tensor:
    return torch.arange(n * 16, dtype=torch.float32).reshape(n, 1, 4, 4)


def test_token_removal_auc_refuses_non_finite_images() -> None:
    model = small_timm()
    x = _bad_images()
    with pytest.raises(NonFiniteInputError, match=r"at indices \[2\]"):
        token_removal_auc(model, x, _grid_maps(4), target=0, fractions=FR)
    x[2] = images(1)[0]
    x[0, 1, 2, 3] = float("inf")
    with pytest.raises(NonFiniteInputError, match=r"at indices \[0\]"):
        token_removal_auc(model, x, _grid_maps(4), target=0, fractions=FR, max_examples_per_batch=1)


def test_pixel_removal_auc_refuses_non_finite_images_and_baseline() -> None:
    model = small_timm()
    with pytest.raises(NonFiniteInputError, match=r"at indices \[2\]"):
        pixel_removal_auc(model, _bad_images(), _grid_maps(4), target=0, fractions=FR)
    with pytest.raises(InputValidationError, match="baseline contains NaN"):
        pixel_removal_auc(model, images(2), _grid_maps(2), target=0, fractions=FR, baseline=float("nan"))
    with pytest.raises(InputValidationError, match="no images"):
        pixel_removal_auc(model, images(0), _grid_maps(0), target=0, fractions=FR)


def test_empty_batches() -> None:
    model = small_timm()
    with pytest.raises(InputValidationError, match="no images"):
        token_removal_auc(model, images(0), _grid_maps(0), target=0, fractions=FR)
    with pytest.raises(InputValidationError, match="non-empty batch"):
        RandomRanking(model).attribute(images(0))


def test_rankings_refuse_non_finite_images() -> None:
    model = small_timm()
    with pytest.raises(NonFiniteInputError, match=r"\[2\]"):
        RandomRanking(model).attribute(_bad_images())
    with pytest.raises(NonFiniteInputError, match=r"\[2\]"):
        LinearProbeRanking(model).fit(_bad_images(), [0, 1, 2, 3])
    probe = LinearProbeRanking(model).fit(images(8, seed=3), torch.arange(8) % 7)
    with pytest.raises(NonFiniteInputError, match=r"\[2\]"):
        probe.attribute(_bad_images(), target=0)
    with pytest.raises(NonFiniteInputError, match=r"\[2\]"):
        probe.accuracy(_bad_images(), [0, 1, 2, 3])
    for size in (0, -1, 1.5):
        with pytest.raises(InputValidationError, match="must be a positive int"):
            probe.attribute(images(2), target=0, internal_batch_size=size)
        with pytest.raises(InputValidationError, match="must be a positive int"):
            LinearProbeRanking(model).fit(images(4), [0, 1, 2, 3], batch_size=size)


def test_compare_explanations_names_the_image_in_the_whole_stream() -> None:
    model = small_timm()
    x, y = images(6), torch.arange(6) % 7
    x[4, 0] = float("nan")
    methods = {"random": RandomRanking(model)}
    with pytest.raises(NonFiniteInputError, match=r"at indices \[4\]"):  # batch 3, position 0
        compare_explanations(model, x, y, methods=methods, fractions=FR, batch_size=2)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    with pytest.raises(NonFiniteInputError, match=r"at indices \[4\]"):
        compare_explanations(model, batches, methods=methods, fractions=FR)
