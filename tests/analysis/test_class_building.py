"""Class similarity change and residual match against hook-based direct computations."""

from __future__ import annotations

import pytest
import torch
from conftest import TIMM_VARIANTS, images, small_timm
from mech_helpers import assert_rates_equal, hook_states, lens, make_loader, predictions, randomized

from captum_clsemb import InputValidationError
from captum_clsemb.analysis import (
    RESIDUAL_MATCH_CATEGORIES,
    class_similarity_change,
    class_similarity_change_rate,
    residual_match,
    residual_match_rate,
)
from captum_clsemb.convert import timm_to_hf


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return randomized(small_timm(num_classes=9), seed=7)


def target_logit(model, states, target) -> torch.Tensor:
    lg = lens(model, states)
    return torch.stack([lg[i, :, int(c)] for i, c in enumerate(target)])


def direct_change(model, x, target, mlp_input) -> tuple[torch.Tensor, torch.Tensor]:
    states = hook_states(model, x)
    attn, mlp = [], []
    for s in states:
        attn.append(target_logit(model, s["attn_out"], target) > target_logit(model, s["resid_pre"], target))
        ref = s["resid_mid"] if mlp_input == "true" else s["resid_pre"]
        mlp.append(target_logit(model, s["mlp_out"], target) > target_logit(model, ref, target))
    return torch.stack(attn, 1), torch.stack(mlp, 1)


def test_change_equals_direct_computation(model) -> None:
    x = images(4)
    target = torch.tensor([0, 3, 8, 5])
    results = {}
    for variant in ("true", "previous_block"):
        ours = class_similarity_change(model, x, target=target, mlp_input=variant)
        attn, mlp = direct_change(model, x, target, variant)
        assert torch.equal(ours["attn"], attn) and torch.equal(ours["mlp"], mlp)
        assert 0 < ours["mlp"].float().mean() < 1
        results[variant] = ours
    assert torch.equal(results["true"]["attn"], results["previous_block"]["attn"])
    assert not torch.equal(results["true"]["mlp"], results["previous_block"]["mlp"])  # the variants differ


def test_change_rate_pools_tokens_streams_and_defaults_to_prediction(model) -> None:
    x = images(5)
    target = torch.tensor([0, 3, 8, 5, 1])
    ch = class_similarity_change(model, x, target=target)
    rates = class_similarity_change_rate(model, x, target=target)
    for layer in ("attn", "mlp"):
        torch.testing.assert_close(rates[layer]["cls"], 100 * ch[layer][:, :, 0].double().mean(0))
        torch.testing.assert_close(rates[layer]["image"], 100 * ch[layer][:, :, 1:].double().mean(dim=(0, 2)))
    assert_rates_equal(class_similarity_change_rate(model, make_loader(x, target, batch_size=2)), rates)
    pred = predictions(model, x)
    assert_rates_equal(
        class_similarity_change_rate(model, x), class_similarity_change_rate(model, x, target=pred)
    )
    with pytest.raises(InputValidationError, match="mlp_input"):
        class_similarity_change_rate(model, x, mlp_input="resid")


def direct_category(model, x) -> torch.Tensor:
    """Explicit if/elif priority chain per token."""
    states = hook_states(model, x)
    n, t = x.shape[0], states[0]["resid_post"].shape[1]
    out = torch.empty(n, len(states), t, dtype=torch.long)
    for b, s in enumerate(states):
        top = {k: lens(model, s[k]).argmax(-1) for k in ("resid_post", "attn_out", "mlp_out", "resid_pre")}
        for i in range(n):
            for j in range(t):
                c = top["resid_post"][i, j]
                if c == top["attn_out"][i, j]:
                    out[i, b, j] = 0
                elif c == top["mlp_out"][i, j]:
                    out[i, b, j] = 1
                elif c == top["resid_pre"][i, j]:
                    out[i, b, j] = 2
                else:
                    out[i, b, j] = 3
    return out


def test_residual_match_categories_equal_direct_computation(model) -> None:
    x = images(4)
    ours = residual_match(model, x)
    assert torch.equal(ours, direct_category(model, x))
    assert len(ours.unique()) >= 3  # several categories occur
    rates = residual_match_rate(model, x)
    for group, pos in (("all", slice(None)), ("cls", 0), ("image", slice(1, None))):
        total = sum(rates[group][c] for c in RESIDUAL_MATCH_CATEGORIES)
        torch.testing.assert_close(total, torch.full((3,), 100.0, dtype=torch.float64))
        for i, c in enumerate(RESIDUAL_MATCH_CATEGORIES):
            sel = ours[:, :, pos] == i
            expected = 100 * (sel.double().mean(0) if sel.dim() == 2 else sel.double().mean(dim=(0, 2)))
            torch.testing.assert_close(rates[group][c], expected)


def test_residual_match_non_exclusive(model) -> None:
    x = images(4)
    states = hook_states(model, x)
    overlap = residual_match_rate(model, x, exclusive=False)["all"]
    exclusive = residual_match_rate(model, x)["all"]
    for b, s in enumerate(states):
        top = lens(model, s["resid_post"]).argmax(-1)
        m = {k: lens(model, s[v]).argmax(-1) == top for k, v in
             (("attn", "attn_out"), ("mlp", "mlp_out"), ("residual", "resid_pre"))}  # fmt: skip
        for k, v in m.items():
            assert overlap[k][b].item() == pytest.approx(100 * v.double().mean().item())
        none = ~(m["attn"] | m["mlp"] | m["residual"])
        assert overlap["composite"][b].item() == pytest.approx(100 * none.double().mean().item())
    torch.testing.assert_close(overlap["composite"], exclusive["composite"])
    torch.testing.assert_close(overlap["attn"], exclusive["attn"])  # top priority is unaffected
    assert (overlap["residual"] >= exclusive["residual"]).all()


def test_residual_match_streams_and_gap_model(model) -> None:
    x = images(5)
    assert_rates_equal(
        residual_match_rate(model, make_loader(x, batch_size=2)), residual_match_rate(model, x)
    )
    gap = randomized(TIMM_VARIANTS["gap_fc_norm"](), seed=1)
    rates = residual_match_rate(gap, x)
    assert set(rates) == {"all", "image"}
    torch.testing.assert_close(sum(rates["image"].values()), torch.full((3,), 100.0, dtype=torch.float64))


def test_timm_and_hf_twins_agree(model) -> None:
    hf = timm_to_hf(model).eval()
    x = images(3)
    target = torch.tensor([1, 2, 4])
    for variant in ("true", "previous_block"):
        assert_rates_equal(
            class_similarity_change_rate(model, x, target, mlp_input=variant),
            class_similarity_change_rate(hf, x, target, mlp_input=variant),
        )
    assert torch.equal(residual_match(model, x), residual_match(hf, x))
