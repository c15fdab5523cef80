"""Perturbation experiments, token labels from masks and the composite test bed, against
direct per-image computations with the unmodified timm modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import images, small_timm
from mech_helpers import assert_rates_equal, hook_states, lens, make_loader, predictions, randomized

from captum_clsemb import BlockwiseIdentifiability, InputValidationError
from captum_clsemb.analysis import (
    attention_edit_effect,
    class_context_identifiability,
    identifiability_summary,
    make_composite_images,
    patch_coverage,
    patch_labels_from_mask,
    token_group_removal_effect,
)
from captum_clsemb.attr import identifiability_rate, mean_identifiability
from captum_clsemb.convert import timm_to_hf


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return randomized(small_timm(num_classes=5), seed=11, scale=0.25)


def top1_hits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, T) bool: target is the top-1 class (no class with a strictly greater logit)."""
    tl = torch.stack([logits[i, :, int(c)] for i, c in enumerate(target)])
    return (logits > tl[..., None]).sum(-1) == 0


def manual_self_only_states(model, x) -> list[torch.Tensor]:
    """Block outputs with image tokens attending only to themselves, written out by hand."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    out = []
    with torch.no_grad():
        for blk in model.blocks:
            a = blk.attn
            y = blk.norm1(h)
            n, t, c = y.shape
            q, k, v = a.qkv(y).reshape(n, t, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            z = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
            z[:, :, 1:] = v[:, :, 1:]  # an image token's attention output is its own value
            h = h + blk.ls1(a.proj(z.transpose(1, 2).reshape(n, t, c)))
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
            out.append(h)
    return out


def test_attention_edit_effect_self_only(model) -> None:
    x = images(4)
    target = torch.tensor([0, 1, 4, 2])
    res = attention_edit_effect(model, x, target=target, attention_edit="self_only")
    scores = BlockwiseIdentifiability(model).attribute(x, target=target)
    torch.testing.assert_close(res["clean"]["rate"]["image"], identifiability_rate(scores, 1, None).double())
    torch.testing.assert_close(
        res["clean"]["mean"]["image"], mean_identifiability(scores, ("cls",))["image"].double()
    )
    for b, h in enumerate(manual_self_only_states(model, x)):
        hits = top1_hits(lens(model, h), target)
        assert res["edited"]["rate"]["image"][b].item() == pytest.approx(
            100 * hits[:, 1:].double().mean().item()
        )
        assert res["edited"]["rate"]["cls"][b].item() == pytest.approx(
            100 * hits[:, 0].double().mean().item()
        )
    assert not torch.equal(res["clean"]["rate"]["image"], res["edited"]["rate"]["image"])


def test_attention_edit_effect_defaults_to_clean_prediction_and_streams(model) -> None:
    x = images(5)
    pred = predictions(model, x)
    a = attention_edit_effect(model, x, attention_edit="no_cls")
    assert_rates_equal(a, attention_edit_effect(model, x, target=pred, attention_edit="no_cls"))
    assert_rates_equal(
        a, attention_edit_effect(model, make_loader(x, pred, batch_size=2), attention_edit="no_cls")
    )
    custom = attention_edit_effect(model, x, target=pred, attention_edit=lambda b, p: p, edit_blocks=[0])
    assert_rates_equal(custom["clean"], custom["edited"])  # identity edit changes nothing


def test_identifiability_summary_matches_blockwise_and_streams(model) -> None:
    x = images(5)
    target = torch.tensor([0, 1, 2, 3, 4])
    scores = BlockwiseIdentifiability(model).attribute(x, target=target)
    s = identifiability_summary(model, x, target=target)
    means = mean_identifiability(scores, ("cls",))
    torch.testing.assert_close(s["mean"]["image"], means["image"].double())
    torch.testing.assert_close(s["mean"]["cls"], means["cls"].double())
    torch.testing.assert_close(s["rate"]["image"], identifiability_rate(scores, 1, None).double())
    assert_rates_equal(identifiability_summary(model, make_loader(x, target, batch_size=3)), s)


def test_patch_labels_threshold_on_hand_made_mask() -> None:
    mask = torch.zeros(8, 8, dtype=torch.bool)  # 2x2 grid of 4x4 cells (16 pixels each)
    mask[0, 4] = True  # cell (0, 1): only its top-left pixel (the authors' nearest sample)
    mask[4:6, 0:4] = True  # cell (1, 0): 8 of 16 pixels
    mask[4:8, 4:8] = True  # cell (1, 1): full
    torch.testing.assert_close(patch_coverage(mask, 2), torch.tensor([[0.0, 1 / 16, 0.5, 1.0]]))
    assert patch_labels_from_mask(mask, 2).tolist() == [[False, False, True, True]]
    assert patch_labels_from_mask(mask, (2, 2), threshold=0.6).tolist() == [[False, False, False, True]]
    assert patch_labels_from_mask(mask, 2, threshold=0.05).tolist() == [[False, True, True, True]]
    assert patch_labels_from_mask(mask, 2, threshold=1.0).tolist() == [[False, False, False, True]]
    soft = torch.full((1, 8, 8), 0.5)
    assert patch_labels_from_mask(soft, 2).all() and not patch_labels_from_mask(soft, 2, threshold=0.51).any()
    # non-divisible size: adaptive bins rows [0, 5) and [4, 9)
    odd = torch.zeros(9, 9)
    odd[:5] = 1
    torch.testing.assert_close(patch_coverage(odd, 2), torch.tensor([[1.0, 1.0, 0.2, 0.2]]))
    for bad in (0, 1.5, True):
        with pytest.raises(InputValidationError, match="threshold"):
            patch_labels_from_mask(mask, 2, threshold=bad)
    with pytest.raises(InputValidationError, match="smaller"):
        patch_labels_from_mask(torch.ones(1, 2, 2), 4)
    with pytest.raises(InputValidationError, match=r"\[0, 1\]"):
        patch_coverage(torch.full((4, 4), 2.0), 2)


def test_make_composite_images_exact_masks() -> None:
    g = torch.Generator().manual_seed(0)
    objects, bgs = torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    imgs, masks = make_composite_images(objects, bgs, size=16, position=(8, 16))
    assert masks.shape == (3, 32, 32) and masks.dtype == torch.bool
    assert masks[:, 8:24, 16:32].all() and masks.sum() == 3 * 256
    torch.testing.assert_close(imgs[:, :, 8:24, 16:32], objects)
    torch.testing.assert_close(imgs.masked_fill(masks[:, None], 0), bgs.masked_fill(masks[:, None], 0))
    # resized object, centred, aligned to the 8-pixel patch grid
    imgs, masks = make_composite_images(objects[:, :, :8, :8], bgs, size=0.5, position=(5, 13), align=8)
    assert masks[:, 0:16, 8:24].all() and masks.sum() == 3 * 256
    resized = F.interpolate(objects[:, :, :8, :8], size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(imgs[:, :, 0:16, 8:24], resized)
    assert set(patch_coverage(masks, 4).unique().tolist()) == {0.0, 1.0}  # patch-aligned
    _, centred = make_composite_images(objects, bgs[0], size=(8, 16))
    assert centred[:, 12:20, 8:24].all() and centred.sum() == 3 * 128
    _, r1 = make_composite_images(
        objects, bgs, size=8, position="random", generator=torch.Generator().manual_seed(3)
    )
    _, r2 = make_composite_images(
        objects, bgs, size=8, position="random", generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(r1, r2) and (r1.sum((1, 2)) == 64).all()
    with pytest.raises(InputValidationError, match="fit"):
        make_composite_images(objects, bgs, size=16, position=(20, 0))


def labelled_batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Composite images whose object covers a different number of patches per image."""
    g = torch.Generator().manual_seed(5)
    objects, bgs = torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 32, 32, generator=g)
    sizes = [(8, 8), (16, 8), (16, 16), (8, 24)][:n]
    imgs, masks = [], []
    for i, s in enumerate(sizes):
        im, m = make_composite_images(objects[i : i + 1], bgs[i : i + 1], size=s, position=(8, 0))
        imgs.append(im)
        masks.append(m)
    return torch.cat(imgs), torch.tensor([0, 3, 1, 2])[:n], torch.cat(masks)


def direct_group_scores(model, x, target, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, B, P) identifiability scores (Eq. 1 via argsort) from hooks, and labels (N, P)."""
    states = hook_states(model, x)
    scores = []
    for s in states:
        lg = lens(model, s["resid_post"])[:, 1:]
        order = lg.argsort(-1, descending=True)
        pos = torch.stack([(order[i] == int(c)).float().argmax(-1) for i, c in enumerate(target)])
        scores.append(1 - pos / lg.shape[-1])
    return torch.stack(scores, 1), labels


def test_class_context_identifiability_equals_direct(model) -> None:
    x, y, masks = labelled_batch()
    labels = torch.stack(
        [
            torch.tensor(
                [
                    masks[i, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8].float().mean() >= 0.5
                    for r in range(4)
                    for c in range(4)
                ]
            )
            for i in range(len(x))
        ]  # fmt: skip
    )
    scores, _ = direct_group_scores(model, x, y, labels)
    res = class_context_identifiability(model, x, target=y, masks=masks)
    for name, sel in (("class", labels), ("context", ~labels)):
        w = sel[:, None, :].double()
        torch.testing.assert_close(res[name]["mean"], (scores * w).sum((0, 2)) / w.sum((0, 2)))
        torch.testing.assert_close(res[name]["rate"], 100 * ((scores == 1) * w).sum((0, 2)) / w.sum((0, 2)))
        assert int(res["num_tokens"][name]) == int(sel.sum())
        per_image = ((scores == 1) * w).sum(2) / w.sum(2)  # (N, B); every image has both groups here
        by_image = class_context_identifiability(model, x, target=y, masks=masks, average="images")
        torch.testing.assert_close(by_image[name]["rate"], 100 * per_image.mean(0))
    same = class_context_identifiability(model, x, target=y, masks=labels)  # token labels directly
    assert_rates_equal(same, res)
    streamed = class_context_identifiability(model, make_loader(x, y, masks, batch_size=3))
    assert_rates_equal(streamed, res)


def direct_removal(model, x, target, keep) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: drop tokens after the position embedding and run the timm blocks."""
    hits = torch.zeros(len(model.blocks), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for i in range(len(x)):
            idx = [0] + [p + 1 for p in keep[i].nonzero()[:, 0].tolist()]
            h = model.norm_pre(model._pos_embed(model.patch_embed(x[i : i + 1])))[:, idx]
            for b, blk in enumerate(model.blocks):
                h = blk(h)
                hits[b] += top1_hits(lens(model, h[:, 1:]), target[i : i + 1]).sum()
            count += len(idx) - 1
    return 100 * hits / count, torch.tensor(count)


@pytest.mark.parametrize("remove", ["context", "class"])
def test_token_removal_equals_per_image_dropping(model, remove) -> None:
    x, y, masks = labelled_batch()
    labels = patch_labels_from_mask(masks, 4)
    keep = labels if remove == "context" else ~labels
    assert len(keep.sum(1).unique()) > 1  # images keep different numbers of tokens
    expected, _ = direct_removal(model, x, y, keep)
    drop = token_group_removal_effect(model, x, target=y, masks=masks, remove=remove)
    torch.testing.assert_close(drop["removed"]["rate"], expected)
    mask = token_group_removal_effect(model, x, target=y, masks=masks, remove=remove, method="mask")
    torch.testing.assert_close(mask["removed"]["mean"], drop["removed"]["mean"])
    torch.testing.assert_close(mask["removed"]["rate"], drop["removed"]["rate"])
    clean = class_context_identifiability(model, x, target=y, masks=masks)[drop["kept"]]
    assert_rates_equal(drop["clean"], clean)
    assert drop["kept"] == ("class" if remove == "context" else "context")
    streamed = token_group_removal_effect(model, make_loader(x, y, masks, batch_size=3), remove=remove)
    assert_rates_equal(streamed, drop)


def test_token_removal_skips_images_without_remaining_tokens(model) -> None:
    x, y, masks = labelled_batch()
    masks[1] = False  # no class token in image 1
    res = token_group_removal_effect(model, x, target=y, masks=masks, remove="context")
    assert int(res["num_skipped"]) == 1 and int(res["num_images"]) == 4
    keep = patch_labels_from_mask(masks, 4)
    torch.testing.assert_close(res["removed"]["rate"], direct_removal(model, x, y, keep)[0])
    with pytest.raises(InputValidationError, match="masks are required"):
        token_group_removal_effect(model, x, target=y)
    with pytest.raises(InputValidationError, match="remove"):
        token_group_removal_effect(model, x, target=y, masks=masks, remove="all")


def test_timm_and_hf_twins_agree(model) -> None:
    hf = timm_to_hf(model).eval()
    x, y, masks = labelled_batch()
    assert_rates_equal(
        attention_edit_effect(model, x, y, attention_edit="self_only"),
        attention_edit_effect(hf, x, y, attention_edit="self_only"),
    )
    assert_rates_equal(
        token_group_removal_effect(model, x, y, masks=masks),
        token_group_removal_effect(hf, x, y, masks=masks),
    )
