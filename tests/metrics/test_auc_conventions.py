"""AUC conventions and removal counts against closed forms."""

from __future__ import annotations

import warnings

import pytest
import torch

from captum_clsemb import InputValidationError
from captum_clsemb.metrics import DEFAULT_FRACTIONS, authors_auc, token_removal_auc, trapezoid_auc
from captum_clsemb.metrics.auc import authors_fractions, pixels_to_remove, tokens_to_remove


def test_default_fractions_are_chefer_steps() -> None:
    assert len(DEFAULT_FRACTIONS) == 10
    torch.testing.assert_close(torch.tensor(DEFAULT_FRACTIONS), torch.arange(10) / 10, check_dtype=False)


def test_trapezoid_auc_closed_forms() -> None:
    fr = torch.tensor(DEFAULT_FRACTIONS, dtype=torch.float64)
    # flat at 1 over [0, 0.9]: 0.9 * 100
    assert trapezoid_auc(torch.ones(10, dtype=torch.float64)).item() == pytest.approx(90.0)
    # linear 1 - f: integral_0^0.9 (1 - f) df = 0.9 - 0.405 = 0.495 (exact for the trapezoid rule)
    assert trapezoid_auc(1 - fr).item() == pytest.approx(49.5)
    # quadratic f^2 on 10 equal steps of 0.1: exact integral 0.243 plus the trapezoid error h^2 (b-a)/12 * f''
    # = 0.01 * 0.9 / 12 * 2 = 0.0015 -> 0.2445
    assert trapezoid_auc(fr**2).item() == pytest.approx(24.45)
    # uneven x: points (0, 1), (0.5, 0), (1, 1) -> two triangles of area 0.25
    assert trapezoid_auc(torch.tensor([1.0, 0.0, 1.0]), fractions=(0.0, 0.5, 1.0)).item() == pytest.approx(
        50.0
    )
    # batched over leading dims
    out = trapezoid_auc(torch.stack([torch.ones(10), torch.zeros(10)]))
    torch.testing.assert_close(out, torch.tensor([90.0, 0.0]))


def test_authors_normalised_sum_known_curve() -> None:
    # the authors' curve of 1..P-1 kept tokens has P - 1 points; their sum divides by max * P
    assert authors_auc(torch.tensor([0.8, 0.8, 0.4])).item() == pytest.approx(2.0 / (0.8 * 4))
    assert authors_auc(torch.tensor([0.8, 0.8, 0.4]), num_patches=4).item() == pytest.approx(2.0 / (0.8 * 4))
    assert authors_auc(torch.tensor([0.8, 0.8, 0.4]), num_patches=10).item() == pytest.approx(
        2.0 / (0.8 * 10)
    )
    # a flat curve of P - 1 = 48 points scores 48/49 (ViT-B/32), whatever its level
    assert authors_auc(torch.full((48,), 0.3)).item() == pytest.approx(48 / 49)
    # per-example values average to the normalised sum of the mean curve
    curves = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    per_example = authors_auc(curves)
    mean_curve = curves.mean(0)  # [1, .5, .5, .5] -> sum 2.5, max 1, P = 5 -> 2.5 / 5
    assert per_example.mean().item() == pytest.approx(2.5 / 5)
    torch.testing.assert_close(per_example, curves.sum(1) / (mean_curve.max() * 5))
    with pytest.raises(InputValidationError, match="num_patches"):
        authors_auc(curves, num_patches=0)


def test_authors_number_for_vit_b32_scale() -> None:
    # ViT-B/32: P = 49, a curve of 48 points; the old normaliser (48) was P/(P-1) too large
    m = torch.linspace(0.84, 0.2, 48, dtype=torch.float64)
    ours = authors_auc(m).item()
    assert ours == pytest.approx(m.sum().item() / (0.84 * 49))
    assert m.sum().item() / (0.84 * 48) == pytest.approx(ours * 49 / 48)
    assert authors_fractions(49) == [k / 49 for k in range(1, 49)]


def test_token_removal_authors_auc_on_the_authors_fractions() -> None:
    # small ViT: 16 patches; the authors' fractions k/16, k = 1..15, keep 15..1 tokens
    from conftest import images, small_timm

    model, x = small_timm(), images(6, seed=4)
    attr = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    fr = authors_fractions(16)  # no labels: accuracy against the clean prediction
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the authors' own fractions
        auc, curves = token_removal_auc(model, x, attr, fractions=fr, auc="authors", return_curve=True)
    m = curves.mean(0)
    assert curves.shape == (6, 15) and m.max() > 0
    assert auc.mean().item() == pytest.approx(m.sum().item() / (m.max().item() * 16), rel=1e-6)
    torch.testing.assert_close(auc, curves.sum(1) / (m.max() * 16))


def test_authors_normalised_sum_undefined_for_nonpositive_max() -> None:
    with pytest.warns(UserWarning, match="undefined"):
        out = authors_auc(torch.tensor([[-1.0, -2.0]]))
    assert torch.isnan(out).all()


def test_removal_counts_rounding() -> None:
    fr = torch.tensor([0.0, 0.1, 0.25, 0.35, 0.5, 1.0], dtype=torch.float64)
    # tokens: round half up (Python's round() would give 2 for 2.5 and 3 for 0.35 * 10 = 3.4999...)
    assert tokens_to_remove(fr, 10) == [0, 1, 3, 4, 5, 10]
    assert tokens_to_remove(fr, 49) == [0, 5, 12, 17, 25, 49]
    # pixels: floor, with float noise removed (0.29 * 100 = 28.999999999999996 -> 29)
    assert pixels_to_remove(torch.tensor([0.29, 0.3, 0.999], dtype=torch.float64), 100) == [29, 30, 99]


@pytest.mark.parametrize("bad", [(), (0.5, 0.2), (0.0, 1.5), (-0.1, 0.3), (0.1, 0.1)])
def test_bad_fractions_raise(bad) -> None:
    with pytest.raises(InputValidationError, match="fractions"):
        trapezoid_auc(torch.ones(max(len(bad), 1)), fractions=bad)
