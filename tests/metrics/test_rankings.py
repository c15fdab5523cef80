"""Random rankings and linear-probe rankings against independent computations."""

from __future__ import annotations

import pytest
import torch
from conftest import TIMM_VARIANTS, images, small_timm

from captum_clsemb import InputValidationError
from captum_clsemb.metrics import LinearProbeRanking, RandomRanking, random_attributions, ridge_from_stats
from captum_clsemb.trace import trace


def test_random_rankings_reproducible_distinct_and_batch_independent() -> None:
    a = random_attributions(50, (4, 4), seed=3)
    assert a.shape == (50, 1, 4, 4)
    assert torch.equal(a, random_attributions(50, (4, 4), seed=3))
    # each row is a permutation of the ranks (no ties)
    assert torch.equal(a.flatten(1).sort(1).values, torch.arange(16.0).expand(50, -1))
    # different across images and across seeds
    assert torch.unique(a.flatten(1), dim=0).shape[0] == 50
    assert not torch.equal(a, random_attributions(50, (4, 4), seed=4))
    # example i gets the same order whatever the batch it is drawn in
    assert torch.equal(a[20:35], random_attributions(15, (4, 4), seed=3, offset=20))
    rr = RandomRanking(small_timm(), seed=3)
    parts = [rr.attribute(images(n)) for n in (7, 13, 30)]
    assert torch.equal(torch.cat(parts), a)
    rr.reset()
    assert torch.equal(rr.attribute(images(2)), a[:2])
    # the authors' variant: one order for every image
    same = random_attributions(5, (4, 4), seed=3, per_image=False)
    assert torch.equal(same, a[:1].expand(5, -1, -1, -1))


def test_ridge_closed_form_equals_lstsq_on_augmented_system() -> None:
    g = torch.Generator().manual_seed(0)
    n, d, c, alpha = 12, 5, 3, 0.7
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1
    Y = torch.randn(n, c, generator=g, dtype=torch.float64)
    w, b = ridge_from_stats(X.T @ X, X.T @ Y, X.sum(0), Y.sum(0), n, alpha)
    # Independent: least squares on [X 1; sqrt(alpha) I 0] [W; b] = [Y; 0] (intercept not penalised)
    A = torch.cat([torch.cat([X, torch.ones(n, 1, dtype=X.dtype)], 1),
                   torch.cat([alpha**0.5 * torch.eye(d, dtype=X.dtype), torch.zeros(d, 1, dtype=X.dtype)], 1)])  # fmt: skip
    B = torch.cat([Y, torch.zeros(d, c, dtype=X.dtype)])
    sol = torch.linalg.lstsq(A, B).solution
    torch.testing.assert_close(w, sol[:d])
    torch.testing.assert_close(b, sol[d])


def test_linear_probe_fit_equals_independent_solve_per_token() -> None:
    model = small_timm()
    x, y = images(24, seed=5), torch.arange(24) % 7
    probe = LinearProbeRanking(model, layers=("block", "mlp")).fit(x, y, batch_size=10)
    states = trace(model, x, record=["resid_post", "mlp_out"]).cache
    targets = torch.nn.functional.one_hot(y, 7).double() * 2 - 1
    for layer, kind, b, t in (
        ("block", "resid_post", 0, 0),
        ("block", "resid_post", 2, 9),
        ("mlp", "mlp_out", 1, 4),
    ):
        X = states[kind, b][:, t].double()
        A = torch.cat([torch.cat([X, torch.ones(24, 1, dtype=X.dtype)], 1),
                       torch.cat([torch.eye(32, dtype=X.dtype), torch.zeros(32, 1, dtype=X.dtype)], 1)])  # fmt: skip
        sol = torch.linalg.lstsq(A, torch.cat([targets, torch.zeros(32, 7, dtype=X.dtype)])).solution
        torch.testing.assert_close(probe.weights[(layer, b)][t].double(), sol[:32], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(probe.bias[(layer, b)][t].double(), sol[32], atol=1e-5, rtol=1e-4)


def test_linear_probe_attribution_is_summed_identifiability() -> None:
    model = TIMM_VARIANTS["registers"]()  # 4 register tokens + class token before the patches
    probe = LinearProbeRanking(model).fit(images(21, seed=6), torch.arange(21) % 7)
    x = images(3)
    target = torch.tensor([1, 4, 6])
    attr = probe.attribute(x, target=target, internal_batch_size=2)
    assert attr.shape == (3, 1, 4, 4)
    cache = trace(model, x, record=["resid_post"]).cache
    expected = torch.zeros(3, 16)
    ranks = torch.zeros(3, 16)
    for b in range(3):
        logits = torch.einsum("ntd,tdc->ntc", cache["resid_post", b][:, 5:], probe.weights[("block", b)][5:])
        logits = logits + probe.bias[("block", b)][5:]
        rank = (logits > logits.gather(2, target[:, None, None].expand(-1, 16, 1))).sum(-1).float()
        ranks += rank
        expected += 1 - rank / 7
    torch.testing.assert_close(attr.flatten(1), expected)
    # the authors' order (ascending summed rank) is the descending order of the scores
    assert torch.equal(torch.argsort(attr.flatten(1), dim=1, descending=True, stable=True),
                       torch.argsort(ranks, dim=1, stable=True))  # fmt: skip
    # target None: the model's prediction
    pred = trace(model, x).logits.argmax(-1)
    torch.testing.assert_close(probe.attribute(x), probe.attribute(x, target=pred))


def test_linear_probe_accuracy_and_errors() -> None:
    model = small_timm()
    xtr, ytr = images(28, seed=8), torch.arange(28) % 7
    probe = LinearProbeRanking(model, blocks=[0, -1]).fit(xtr, ytr)
    acc = probe.accuracy(xtr[:10], ytr[:10], internal_batch_size=4)
    assert acc.shape == (2, 17)
    cache = trace(model, xtr[:10], record=["resid_post"]).cache
    for row, b in enumerate((0, 2)):
        logits = (
            torch.einsum("ntd,tdc->ntc", cache["resid_post", b], probe.weights[("block", b)])
            + probe.bias[("block", b)]
        )
        torch.testing.assert_close(acc[row], (logits.argmax(-1) == ytr[:10, None]).float().mean(0))
    with pytest.raises(InputValidationError, match="not fitted"):
        LinearProbeRanking(model).attribute(xtr[:2])
    with pytest.raises(InputValidationError, match="no probes for blocks"):
        probe.attribute(xtr[:2], blocks=[1])
    with pytest.raises(InputValidationError, match="layers"):
        LinearProbeRanking(model, layers=("resid",))
