"""token_removal_auc against the model run by hand on the kept tokens (timm modules directly)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_VARIANTS, TIMM_VARIANTS, images, model_logits, small_hf, small_timm

from captum_clsemb import InputValidationError
from captum_clsemb.adapters import adapt
from captum_clsemb.metrics import authors_auc, token_removal_auc
from captum_clsemb.metrics.auc import tokens_to_remove
from captum_clsemb.trace import trace

FR = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)


def by_hand_logits(model: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The timm model on prefix tokens + the kept patches (keep: (N, K) patch indices)."""
    with torch.no_grad():
        h = model._pos_embed(model.patch_embed(x))
        p = model.num_prefix_tokens
        idx = torch.cat([torch.arange(p).expand(x.shape[0], -1), keep + p], 1)
        h = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
        for blk in model.blocks:
            h = blk(h)
        return model.forward_head(model.norm(h))


def by_hand_curves(model, x, attr, mode, target, fractions=FR) -> torch.Tensor:
    """Target probability after removing round(f P) tokens, ranked with an explicit per-example argsort."""
    n, num_patches = x.shape[0], attr[0].numel()
    curves = torch.empty(n, len(fractions))
    for i in range(n):
        a = attr[i].flatten()
        # distinct values: descending for positive, ascending for negative
        order = torch.argsort(a, descending=(mode == "positive"))
        for s, f in enumerate(fractions):
            k = int(f * num_patches + 0.5 + 1e-9)
            logits = by_hand_logits(model, x[i : i + 1], order[k:].sort().values[None])
            curves[i, s] = logits.softmax(-1)[0, target[i]]
    return curves


@pytest.mark.parametrize("variant", ["cls_token", "registers", "gap_fc_norm", "distilled"])
@pytest.mark.parametrize("mode", ["negative", "positive"])
def test_equals_model_run_by_hand_on_kept_tokens(variant: str, mode: str) -> None:
    model = TIMM_VARIANTS[variant]()
    x = images(3)
    attr = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([0, 3, 6])
    _, curves = token_removal_auc(model, x, attr, target=target, mode=mode, fractions=FR, score="probability",
                                  return_curve=True)  # fmt: skip
    torch.testing.assert_close(curves, by_hand_curves(model, x, attr, mode, target), atol=1e-5, rtol=1e-4)


def test_zero_removal_gives_unperturbed_score() -> None:
    model, x = small_timm(), images(4)
    attr = torch.randn(4, 16)
    logits = model_logits(model, x)
    target = torch.tensor([1, 2, 3, 4])
    _, c = token_removal_auc(
        model, x, attr, target=target, fractions=(0.0,), score="logit", return_curve=True
    )
    torch.testing.assert_close(c[:, 0], logits.gather(1, target[:, None])[:, 0], atol=1e-5, rtol=1e-5)
    # target None: the clean prediction, whose accuracy is 1 by definition
    _, c = token_removal_auc(model, x, attr, fractions=(0.0, 0.5), return_curve=True)
    assert torch.equal(c[:, 0], torch.ones(4))
    _, p = token_removal_auc(model, x, attr, fractions=(0.0,), score="probability", return_curve=True)
    torch.testing.assert_close(p[:, 0], logits.softmax(-1).max(-1).values, atol=1e-6, rtol=1e-5)


def test_hf_model_zero_removal_equals_hf_logits() -> None:
    model, x = small_hf("vit"), images(2)
    _, c = token_removal_auc(model, x, torch.randn(2, 16), target=[3, 4], fractions=(0.0, 0.5), score="logit",
                             return_curve=True)  # fmt: skip
    torch.testing.assert_close(c[:, 0], model_logits(model, x)[[0, 1], [3, 4]], atol=1e-5, rtol=1e-5)


def test_constant_attributions_give_identical_curves_in_raster_order() -> None:
    # Tie rule: stable sort, lower patch index removed first in both modes.
    model, x = small_timm(), images(3)
    attr = torch.full((3, 1, 4, 4), 0.7)
    target = torch.tensor([0, 1, 2])
    kw = dict(target=target, fractions=FR, score="probability", return_curve=True)
    _, neg = token_removal_auc(model, x, attr, mode="negative", **kw)
    _, pos = token_removal_auc(model, x, attr, mode="positive", **kw)
    assert torch.equal(neg, pos)
    # ... and both remove patches 0, 1, 2, ... (raster order)
    for s, k in enumerate(tokens_to_remove(torch.tensor(FR, dtype=torch.float64), 16)):
        keep = torch.arange(k, 16).expand(3, -1)
        expected = by_hand_logits(model, x, keep).softmax(-1).gather(1, target[:, None])[:, 0]
        torch.testing.assert_close(neg[:, s], expected, atol=1e-5, rtol=1e-4)


def test_batched_equals_per_example() -> None:
    model, x = small_timm(), images(5)
    attr = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    kw = dict(target=[0, 1, 2, 3, 4], fractions=FR, score="probability", return_curve=True)
    auc_all, c_all = token_removal_auc(model, x, attr, **kw)
    auc_2, c_2 = token_removal_auc(model, x, attr, max_examples_per_batch=2, **kw)
    singles = [
        token_removal_auc(model, x[i : i + 1], attr[i : i + 1], **{**kw, "target": [i]}) for i in range(5)
    ]
    torch.testing.assert_close(c_all, c_2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c_all, torch.cat([c for _, c in singles]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(auc_all, torch.cat([a for a, _ in singles]), atol=1e-4, rtol=1e-5)


def test_accuracy_against_labels_and_auc_conventions() -> None:
    model, x = small_timm(), images(4)
    attr = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3])
    auc, acc = token_removal_auc(
        model, x, attr, labels=labels, fractions=FR, mode="positive", return_curve=True
    )
    order = torch.argsort(attr, dim=1, descending=True)
    for s, f in enumerate(FR):
        k = int(f * 16 + 0.5 + 1e-9)
        pred = by_hand_logits(model, x, order[:, k:].sort(1).values).argmax(-1)
        assert torch.equal(acc[:, s], (pred == labels).float())
    fr = torch.tensor(FR, dtype=torch.float64)
    torch.testing.assert_close(auc, torch.trapezoid(acc.double(), x=fr, dim=1).float() * 100)
    # labels None: accuracy against the target
    _, acc_t = token_removal_auc(
        model, x, attr, target=labels, fractions=FR, mode="positive", return_curve=True
    )
    assert torch.equal(acc_t, acc)
    with pytest.warns(UserWarning, match="only on their fractions"):
        authors = token_removal_auc(
            model, x, attr, labels=labels, fractions=FR, mode="positive", auc="authors"
        )
    torch.testing.assert_close(authors, authors_auc(acc, num_patches=16))
    # sum(m) / (max(m) * P) with P = 16 patches
    assert authors.mean().item() == pytest.approx(acc.mean(0).sum().item() / (acc.mean(0).max().item() * 16))


def test_removing_every_token() -> None:
    model, x = small_timm(), images(2)
    _, c = token_removal_auc(model, x, torch.randn(2, 16), target=[0, 1], fractions=(0.0, 1.0), score="logit",
                             return_curve=True)  # fmt: skip
    only_cls = by_hand_logits(model, x, torch.empty(2, 0, dtype=torch.long))
    torch.testing.assert_close(c[:, 1], only_cls[[0, 1], [0, 1]], atol=1e-5, rtol=1e-5)
    with pytest.raises(InputValidationError, match="mean of the patch tokens"):
        token_removal_auc(TIMM_VARIANTS["gap_fc_norm"](), x, torch.randn(2, 16), fractions=(0.0, 1.0))


# heads that read the patch tokens: their mean (GAP, EVA-02 / BEiT mean pooling with the class
# token kept), DINOv2's [class token, patch mean], SigLIP's attention pool
POOLED_HEADS = {
    "gap_fc_norm": ("avg", lambda: TIMM_VARIANTS["gap_fc_norm"]()),
    "eva02_avg": ("avg", FAMILY_VARIANTS["eva02_avg"]),
    "beit_avg": ("avg", FAMILY_VARIANTS["beit_avg"]),
    "hf_dinov2": ("cls+avg", FAMILY_VARIANTS["hf_dinov2"]),
    "hf_dinov2_registers": ("cls+avg", FAMILY_VARIANTS["hf_dinov2_registers"]),
    "siglip_zero_shot": ("map", FAMILY_VARIANTS["siglip_zero_shot"]),
}


@pytest.mark.parametrize("variant", list(POOLED_HEADS))
def test_removing_every_token_is_refused_where_the_head_reads_the_patches(variant: str) -> None:
    # Before: only "avg" was refused; DINOv2 gave NaN logits (the mean of no patches) and
    # scored them as if they were a result.
    pooling, build = POOLED_HEADS[variant]
    model, x = build(), images(2)
    adapter = adapt(model)
    assert adapter.pooling == pooling
    what = {"avg": "mean of the patch tokens", "cls+avg": "class token concatenated with the mean",
            "map": "attention-pool"}[pooling]  # fmt: skip
    with pytest.raises(InputValidationError, match=f"leaves nothing for the head.*{what}"):
        token_removal_auc(model, x, torch.randn(2, 16), fractions=(0.0, 0.5, 1.0))
    with pytest.raises(InputValidationError, match="leaves nothing"):  # 0.98 * 16 rounds to 16
        token_removal_auc(model, x, torch.randn(2, 16), fractions=(0.0, 0.98))
    # one patch left is a real score: the model run on the prefix tokens and that patch
    attr = torch.randn(2, 16)
    _, c = token_removal_auc(model, x, attr, target=[0, 1], fractions=(0.0, 15 / 16), score="logit",
                             mode="positive", return_curve=True)  # fmt: skip
    keep = attr.argmin(1, keepdim=True)  # positive: the least important patch is the last one kept
    expected = trace(adapter, x, keep_tokens=keep).logits[[0, 1], [0, 1]]
    assert torch.isfinite(c).all()
    torch.testing.assert_close(c[:, 1], expected, atol=1e-5, rtol=1e-5)
    # and where a prefix token remains, the logits with every patch dropped are not a number
    if adapter.has_class_token:
        none_kept = trace(adapter, x, keep_tokens=torch.empty(2, 0, dtype=torch.long)).logits
        assert torch.isnan(none_kept).all()


def test_input_errors() -> None:
    model, x = small_timm(), images(2)
    with pytest.raises(InputValidationError, match="patch grid"):
        token_removal_auc(model, x, torch.randn(2, 1, 32, 32))
    with pytest.raises(InputValidationError, match="mode"):
        token_removal_auc(model, x, torch.randn(2, 16), mode="deletion")
    with pytest.raises(InputValidationError, match="NaN"):
        token_removal_auc(model, x, torch.full((2, 16), float("nan")))
    with pytest.raises(InputValidationError, match="labels"):
        token_removal_auc(model, x, torch.randn(2, 16), labels=[1, 2, 3])
