"""BlockwiseIdentifiability against independent hook-based computations and closed forms."""

from __future__ import annotations

import pytest
import torch
from conftest import TIMM_VARIANTS, images, model_logits, small_hf, small_timm

from captum_clsemb import BlockwiseIdentifiability, InputValidationError
from captum_clsemb.attr import identifiability_rate, identifiability_scores, images_with_identifiable_token
from captum_clsemb.convert import timm_to_hf


def paper_identifiability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 1 literally: r = 1 - argwhere(argsort(p, descending) == c) / |C|."""
    order = logits.argsort(dim=-1, descending=True)
    pos = (order == target[..., None]).float().argmax(-1)
    return 1 - pos.float() / logits.shape[-1]


def hook_identifiability_timm(
    model, x: torch.Tensor, target: torch.Tensor, where: str = "block"
) -> torch.Tensor:
    """Independent: forward hooks on the unmodified timm model (fused attention), norm + head."""
    states = []
    mods = {
        "block": list(model.blocks),
        "attn": [b.ls1 for b in model.blocks],
        "mlp": [b.ls2 for b in model.blocks],
    }
    handles = [m.register_forward_hook(lambda mod, i, o: states.append(o)) for m in mods[where]]
    with torch.no_grad():
        model(x)
        for h in handles:
            h.remove()
        logits = [model.head(model.fc_norm(model.norm(s))) for s in states]
    return torch.stack(
        [paper_identifiability(lg, target[:, None].expand(-1, lg.shape[1])) for lg in logits], 1
    )


def test_scores_equal_hook_computation_timm() -> None:
    model = small_timm(num_classes=50)
    x = images(4)
    target = torch.tensor([3, 10, 0, 49])
    bi = BlockwiseIdentifiability(model)
    for layer in ("block", "attn", "mlp"):
        ours = bi.attribute(x, target=target, layer=layer)
        assert ours.shape == (4, 3, 17)
        torch.testing.assert_close(ours, hook_identifiability_timm(model, x, target, layer))


def test_scores_equal_hook_computation_gap_model() -> None:
    model = TIMM_VARIANTS["gap_fc_norm"]()
    x = images(3)
    target = torch.tensor([1, 2, 6])
    torch.testing.assert_close(
        BlockwiseIdentifiability(model).attribute(x, target=target),
        hook_identifiability_timm(model, x, target),
    )


def test_scores_equal_hidden_states_computation_hf() -> None:
    model = small_hf("vit", num_labels=40)
    x = images(3)
    target = torch.tensor([5, 0, 39])
    with torch.no_grad():
        hs = model(pixel_values=x, output_hidden_states=True).hidden_states[1:]
        ref = torch.stack([paper_identifiability(model.classifier(model.vit.layernorm(h)), target[:, None].expand(-1, 17))
                           for h in hs], 1)  # fmt: skip
    torch.testing.assert_close(BlockwiseIdentifiability(model).attribute(x, target=target), ref)


def test_target_none_uses_prediction_and_last_class_token_is_one() -> None:
    model = small_timm()
    x = images(5)
    bi = BlockwiseIdentifiability(model)
    pred = model_logits(model, x).argmax(-1)
    scores = bi.attribute(x)
    torch.testing.assert_close(scores, bi.attribute(x, target=pred))
    assert (scores[:, -1, 0] == 1).all()  # the final class token predicts the predicted class


def test_target_forms_are_equivalent() -> None:
    model = small_timm()
    x = images(2)
    bi = BlockwiseIdentifiability(model)
    a = bi.attribute(x, target=3)
    torch.testing.assert_close(a, bi.attribute(x, target=[3, 3]))
    torch.testing.assert_close(a, bi.attribute(x, target=torch.tensor([3, 3])))
    torch.testing.assert_close(a, bi.attribute(x, target=torch.tensor(3)))


def test_timm_and_hf_twins_give_the_same_scores() -> None:
    model = small_timm(num_classes=20)
    twin = timm_to_hf(model).eval()
    x = images(4)
    target = torch.tensor([0, 5, 19, 7])
    for layer in ("block", "attn", "mlp"):
        torch.testing.assert_close(
            BlockwiseIdentifiability(model).attribute(x, target=target, layer=layer),
            BlockwiseIdentifiability(twin).attribute(x, target=target, layer=layer),
        )


def test_ties_count_only_strictly_greater() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert identifiability_scores(logits, torch.tensor([2])).item() == 1.0  # tie with top: rank 0
    assert identifiability_scores(logits, torch.tensor([0])).item() == 0.5  # two strictly greater
    assert identifiability_scores(logits, torch.tensor([3])).item() == 0.25


def test_rates_exclude_prefix_tokens() -> None:
    # (N=2, blocks=1, T=1 prefix + 4 image tokens)
    scores = torch.tensor([[[1.0, 1.0, 0.5, 0.5, 0.5]], [[0.3, 1.0, 1.0, 0.2, 0.2]]])
    assert identifiability_rate(scores, 1).item() == pytest.approx((25 + 50) / 2)
    assert images_with_identifiable_token(scores, 1).item() == 100
    # GAP model without a class token: every token is an image token
    assert identifiability_rate(scores, 0).item() == pytest.approx((40 + 40) / 2)
    scores[1, 0, 1:3] = 0.9
    assert images_with_identifiable_token(scores, 1).item() == 50


def test_helpers_on_model_and_interventions_change_scores() -> None:
    model = TIMM_VARIANTS["registers"]()
    bi = BlockwiseIdentifiability(model)
    x = images(3)
    s = bi.attribute(x, target=1)
    assert bi.identifiability_rate(s).item() == pytest.approx(
        ((s[:, -1, 5:] == 1).float().mean(1).mean() * 100).item()
    )
    curves = bi.mean_identifiability(s)
    torch.testing.assert_close(curves["cls"], s[:, :, 0].mean(0))
    torch.testing.assert_close(curves["image"], s[:, :, 5:].mean((0, 2)))
    kept = bi.attribute(x, target=1, keep_tokens=torch.tensor([0, 1, 2]))
    assert kept.shape == (3, 3, 8)
    assert not torch.equal(bi.attribute(x, target=1, attention_edit="self_only"), s)


def test_internal_batch_size_matches() -> None:
    model = small_timm()
    x = images(5)
    bi = BlockwiseIdentifiability(model)
    torch.testing.assert_close(bi.attribute(x, internal_batch_size=2), bi.attribute(x))


def test_bad_targets_and_options() -> None:
    bi = BlockwiseIdentifiability(small_timm())
    x = images(2)
    with pytest.raises(InputValidationError, match="out of range.*7 classes"):
        bi.attribute(x, target=7)
    with pytest.raises(InputValidationError, match="3 entries but inputs hold 2"):
        bi.attribute(x, target=[0, 1, 2])
    with pytest.raises(InputValidationError, match="integer class indices"):
        bi.attribute(x, target=torch.tensor([0.0, 1.0]))
    with pytest.raises(InputValidationError, match="layer must be"):
        bi.attribute(x, layer="head")
