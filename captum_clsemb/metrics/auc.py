r"""Curve summaries for perturbation tests: the trapezoid AUC and the authors' normalised sum.

A perturbation *curve* holds one score per removal fraction (accuracy, probability or logit
of the model after removing that fraction of the input). Two summaries are provided:

* :func:`trapezoid_auc` — the area under the curve over the fractions actually evaluated,
  ``torch.trapezoid(curve, x=fractions) * 100``. With the default fractions 0, 0.1, ..., 0.9
  this is the convention of Chefer et al. (CVPR 2021, ``pertubation_eval_from_hdf5.py``):
  there is no point at fraction 1, so a curve flat at 1 scores 90 (not 100).
* :func:`authors_auc` — the normalised sum of Vilas et al.'s ``explain_perturbation.py``,
  ``sum(curve) / (max(curve) * P)`` on their curve of 1, ..., P - 1 kept tokens (P patch
  tokens, so the curve has P - 1 points). It is *not* an area: see its docstring.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from captum_clsemb.errors import InputValidationError

#: Chefer et al.'s removal fractions: 0 (the unperturbed input), 0.1, ..., 0.9.
DEFAULT_FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(10))

AUC_CONVENTIONS = ("trapezoid", "authors")
SCORES = ("accuracy", "probability", "logit")
MODES = ("negative", "positive")


def check_fractions(fractions: Sequence[float] | Tensor) -> Tensor:
    """Validate removal fractions: a non-empty, strictly increasing 1-D sequence in [0, 1]."""
    fr = torch.as_tensor(fractions, dtype=torch.float64).flatten()
    if fr.numel() == 0:
        raise InputValidationError(
            "fractions must contain at least one removal fraction, e.g. (0.0, 0.1, ..., 0.9)"
        )
    if not torch.isfinite(fr).all() or fr.min() < 0 or fr.max() > 1:
        raise InputValidationError(f"fractions must lie in [0, 1], got {fr.tolist()}")
    if fr.numel() > 1 and (fr[1:] <= fr[:-1]).any():
        raise InputValidationError(f"fractions must be strictly increasing, got {fr.tolist()}")
    return fr


def tokens_to_remove(fractions: Tensor, num_tokens: int) -> list[int]:
    r"""Number of patch tokens removed at each fraction: round half up, ``floor(f * P + 0.5)``.

    ``f * P`` is first rounded to 9 decimals so that floating-point noise (0.35 * 10 =
    3.4999999999999996) does not move a value across the .5 boundary.
    """
    return [min(num_tokens, math.floor(round(f * num_tokens, 9) + 0.5)) for f in fractions.tolist()]


def pixels_to_remove(fractions: Tensor, num_pixels: int) -> list[int]:
    r"""Number of pixels removed at each fraction: ``floor(f * H * W)`` as Chefer et al.

    ``f * H * W`` is first rounded to 9 decimals (so 0.29 * 100 gives 29, not 28).
    """
    return [min(num_pixels, math.floor(round(f * num_pixels, 9))) for f in fractions.tolist()]


def trapezoid_auc(curves: Tensor, fractions: Sequence[float] | Tensor = DEFAULT_FRACTIONS) -> Tensor:
    r"""Area under perturbation curves by the trapezoid rule, times 100.

    ``torch.trapezoid(curves, x=fractions, dim=-1) * 100``. With ``fractions`` 0, 0.1, ...,
    0.9 (Chefer et al.'s convention) a curve flat at 1 scores 90. The AUC is linear in the
    curve, so the mean of per-example AUCs equals the AUC of the mean curve.

    Args:
        curves: scores (..., S), one per fraction.
        fractions: the S removal fractions (x values). Default: 0, 0.1, ..., 0.9.
    Returns:
        *Tensor* (...,) of areas.

    Examples::

        >>> trapezoid_auc(torch.ones(10))          # 90.0
        >>> trapezoid_auc(torch.tensor([1.0, 0.0]), fractions=(0.0, 1.0))  # 50.0
    """
    fr = check_fractions(fractions).to(device=curves.device, dtype=curves.dtype)
    if curves.shape[-1] != fr.numel():
        raise InputValidationError(
            f"curves have {curves.shape[-1]} points but {fr.numel()} fractions were given; pass the fractions used"
        )
    return torch.trapezoid(curves, x=fr, dim=-1) * 100


def authors_auc(curves: Tensor, num_patches: int | None = None) -> Tensor:
    r"""Vilas et al.'s normalised sum of a mean perturbation curve: ``sum(m) / (max(m) * P)``.

    The authors (``explain_perturbation.py``, ``3_explainability.ipynb``) record top-1
    accuracy with 1, 2, ..., P - 1 of the P patch tokens kept and summarise the mean curve
    ``m`` (P - 1 points) as ``AUC = sum(m) / (max(m) * P)``: the denominator is the number
    of patches, one more than the number of curve points. (A curve flat at its maximum
    therefore scores (P - 1) / P, e.g. 48/49 for ViT-B/32.)

    ``curves`` (N, S) are per-example curves (or one mean curve (S,)); ``m`` is their mean over
    examples. The value returned per example is ``sum(curve_i) / (max(m) * P)``, whose mean
    over the N examples is the authors' number for the set.

    Flaws (why :func:`trapezoid_auc` is the default): it is a rectangle sum, not an area (the
    x spacing is ignored); it is normalised by the curve's own maximum, so any flat curve
    scores the same whatever its level and a curve that *rises* after removal is penalised;
    the normaliser is a property of the whole set, so a per-example value depends on the
    other examples in the call; it is undefined when ``max(m) <= 0`` (e.g. logits), where
    NaN is returned with a warning. The authors also never ran 0 removed tokens and plotted
    their curve with an off-by-one x axis.

    Args:
        curves: (N, S) per-example curves or a single curve (S,).
        num_patches: P, the number of patch tokens. Default: ``S + 1``, which is P for the
            authors' curve of 1, ..., P - 1 kept tokens. Pass it explicitly for any other
            curve (e.g. :func:`~captum_clsemb.metrics.token_removal_auc` passes the model's
            patch count).
    Returns:
        *Tensor* (N,) (or 0-d for a single curve).

    Examples::

        >>> authors_auc(torch.tensor([0.8, 0.8, 0.4]))       # 2.0 / (0.8 * 4) = 0.625 (P = 4)
        >>> authors_auc(acc_curves, num_patches=49)           # ViT-B/32: 48 points, P = 49
    """
    single = curves.dim() == 1
    c = curves.unsqueeze(0) if single else curves
    if c.dim() != 2:
        raise InputValidationError(f"curves must be (N, S) or (S,), got shape {tuple(curves.shape)}")
    if num_patches is None:
        num_patches = c.shape[-1] + 1
    elif not isinstance(num_patches, int) or isinstance(num_patches, bool) or num_patches < 1:
        raise InputValidationError(f"num_patches must be a positive int, got {num_patches!r}")
    peak = c.mean(0).max()
    if not peak > 0:
        warnings.warn(
            "the authors' normalised sum is undefined for a mean curve whose maximum is <= 0; returning NaN "
            "(use auc='trapezoid', or score='accuracy'/'probability')",
            stacklevel=2,
        )
        peak = torch.tensor(float("nan"), dtype=c.dtype, device=c.device)
    out = c.sum(-1) / (peak * num_patches)
    return out[0] if single else out


def authors_fractions(num_patches: int) -> list[float]:
    r"""The authors' removal fractions for P patch tokens: ``k / P`` for k = 1, ..., P - 1.

    With these fractions :func:`~captum_clsemb.metrics.token_removal_auc` removes k tokens
    at step k, i.e. keeps P - 1, ..., 1 of them: the authors' curve, read in removal order.
    """
    if not isinstance(num_patches, int) or isinstance(num_patches, bool) or num_patches < 2:
        raise InputValidationError(f"num_patches must be an int >= 2, got {num_patches!r}")
    return [k / num_patches for k in range(1, num_patches)]


def summarize_curves(curves: Tensor, fractions: Tensor, auc: str, num_patches: int | None = None) -> Tensor:
    """Per-example AUC (N,) of curves (N, S) under the chosen convention.

    ``num_patches`` is the P of the authors' normalised sum (default ``S + 1``, see :func:`authors_auc`).
    """
    if auc == "trapezoid":
        return trapezoid_auc(curves, fractions)
    if auc == "authors":
        return authors_auc(curves, num_patches)
    raise InputValidationError(f"auc must be one of {AUC_CONVENTIONS}, got {auc!r}")
