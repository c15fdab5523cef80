"""ValueVectorProjector against direct weight computations, hook-based key coefficients,
a hand-built model with known value vectors, timm/HF twins and streaming."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TIMM_VARIANTS, images, small_hf, small_timm
from mech_helpers import assert_rates_equal, hook_states, lens, make_loader, predictions, randomized

from captum_clsemb import InputValidationError
from captum_clsemb.analysis import ValueVectorProjector
from captum_clsemb.convert import timm_to_hf
from captum_clsemb.trace import trace

WEIGHTS = {"mlp": lambda blk: blk.mlp.fc2.weight, "attn": lambda blk: blk.attn.proj.weight}
KEYS = {"mlp": "mlp_keys", "attn": "attn_keys"}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return randomized(small_timm(num_classes=12), seed=3)


def direct_agreement(model, x, target, layer, k, k_classes, variant="paper") -> torch.Tensor:
    """Loop over tokens: top-k keys (hooks on the model) vs top classes of E @ W_out columns."""
    states = hook_states(model, x)
    n, t = x.shape[0], states[0]["resid_post"].shape[1]
    out = torch.zeros(n, len(model.blocks), t, dtype=torch.bool)
    for b, blk in enumerate(model.blocks):
        proj = (model.head.weight @ WEIGHTS[layer](blk)).detach()  # (C, M)
        keys = states[b][KEYS[layer]]
        for i in range(n):
            c = int(target[i])
            class_top = proj[c].argsort(descending=True)[:k_classes].tolist()
            for tok in range(t):
                top_keys = keys[i, tok].argsort(descending=True)[:k].tolist()
                if variant == "paper":
                    hit = any(c in proj[:, j].argsort(descending=True)[:k_classes].tolist() for j in top_keys)
                else:
                    hit = any(j in class_top for j in top_keys)
                out[i, b, tok] = hit
    return out


def test_similarity_equals_cosine_of_weights(model) -> None:
    vvp = ValueVectorProjector(model)
    for layer, weight in WEIGHTS.items():
        for b, blk in enumerate(model.blocks):
            w = weight(blk).detach()
            direct = torch.stack(
                [F.cosine_similarity(model.head.weight[c][:, None], w, dim=0) for c in range(12)]
            ).detach()
            torch.testing.assert_close(vvp.similarity(b, layer), direct)
        agreement = vvp.class_value_agreement(layer)
        assert agreement.shape == (3, 12)
        torch.testing.assert_close(agreement[-1], vvp.similarity(-1, layer).max(1).values)


def test_hand_built_value_vectors_give_agreement_one() -> None:
    model = randomized(small_timm(num_classes=7), seed=1)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    norms = torch.arange(1.0, 8.0)
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25, 4.0, 1.5])
    with torch.no_grad():
        model.head.weight.copy_(q[:7] * norms[:, None])  # orthogonal class prototypes
        e = model.head.weight.detach().clone()
        model.blocks[1].mlp.fc2.weight[:, :7] = (e * scales[:, None]).t()  # unit j = scales[j] * E[j]
        model.blocks[2].attn.proj.weight[:, 5] = 2.0 * e[3]
    vvp = ValueVectorProjector(model, class_names=[f"c{i}" for i in range(7)])
    mlp = vvp.class_value_agreement("mlp")
    torch.testing.assert_close(mlp[1], torch.ones(7))
    assert (vvp.class_value_agreement("mlp")[0] < 0.999).all()  # the untouched block is random
    attn = vvp.class_value_agreement("attn")
    assert attn[2, 3].item() == pytest.approx(1.0, abs=1e-6)
    assert (attn[2, [0, 1, 2, 4, 5, 6]] < 0.999).all()
    for j in range(7):
        top = vvp.top_classes(1, "mlp", memory=j, k=2)
        assert top[0].index == j and top[0].name == f"c{j}"
        # E (s E_j) = s |E_j|^2 e_j for orthogonal prototypes
        assert top[0].score == pytest.approx(scales[j].item() * norms[j].item() ** 2, rel=1e-5)
        assert top[1].score == pytest.approx(0.0, abs=1e-4)


def test_top_classes_and_weights_untouched(model) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [f"class{i}" for i in range(12)]
    vvp = ValueVectorProjector(model, class_names=names)
    top = vvp.top_classes(2, "attn", memory=7, k=4)
    direct = (model.head.weight @ model.blocks[2].attn.proj.weight[:, 7]).detach().topk(4)
    assert [c.index for c in top] == direct.indices.tolist()
    assert [c.name for c in top] == [names[i] for i in direct.indices.tolist()]
    torch.testing.assert_close(torch.tensor([c.score for c in top]), direct.values)
    vvp.class_value_agreement("mlp")
    vvp.similarity(0, "attn")
    vvp.attribute(images(2), target=[0, 1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert ValueVectorProjector(model).top_classes(0, "mlp", 0, 1)[0].name is None
    with pytest.raises(InputValidationError, match="layer"):
        vvp.similarity(0, "ffn")
    with pytest.raises(InputValidationError, match="memory"):
        vvp.top_classes(0, "attn", memory=32)
    with pytest.raises(InputValidationError, match="class names"):
        ValueVectorProjector(model, class_names=["a"])


def test_value_vectors_fold_layer_scale_exactly() -> None:
    model = randomized(TIMM_VARIANTS["layer_scale"](), seed=2)
    vvp = ValueVectorProjector(model)
    x = images(2)
    cache = trace(model, x, record="all").cache
    for b, blk in enumerate(model.blocks):
        for layer in ("mlp", "attn"):
            lin = blk.mlp.fc2 if layer == "mlp" else blk.attn.proj
            gamma = (blk.ls2 if layer == "mlp" else blk.ls1).gamma
            # the sub-layer output is the key-weighted sum of value vectors plus a constant
            rebuilt = cache[KEYS[layer], b] @ vvp.value_vectors(b, layer) + lin.bias * gamma
            torch.testing.assert_close(cache[f"{layer}_out", b], rebuilt.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["paper", "authors"])
@pytest.mark.parametrize("layer", ["mlp", "attn"])
def test_attribute_equals_direct_computation(model, layer, variant) -> None:
    x = images(3)
    target = torch.tensor([1, 7, 11])
    vvp = ValueVectorProjector(model)
    ours = vvp.attribute(x, target=target, layer=layer, k=3, k_classes=2, variant=variant)
    assert ours.shape == (3, 3, 17) and ours.dtype == torch.bool
    direct = direct_agreement(model, x, target, layer, 3, 2, variant)
    assert torch.equal(ours, direct)
    assert 0 < ours.float().mean() < 1  # not a trivial all-or-nothing case


def test_attribute_default_target_is_prediction_and_chunking(model) -> None:
    x = images(4)
    vvp = ValueVectorProjector(model)
    pred = predictions(model, x)
    ours = vvp.attribute(x, layer="mlp", k=2, internal_batch_size=3)
    assert torch.equal(ours, vvp.attribute(x, target=pred, layer="mlp", k=2))


def test_paper_and_authors_definitions_differ(model) -> None:
    x = images(3)
    vvp = ValueVectorProjector(model)
    paper = vvp.attribute(x, target=[0, 1, 2], layer="mlp", k=5)
    authors = vvp.attribute(x, target=[0, 1, 2], layer="mlp", k=5, variant="authors")
    assert not torch.equal(paper, authors)


def test_key_value_agreement_rate_matches_attribute_and_streams(model) -> None:
    x = images(6)
    pred = predictions(model, x)
    labels = pred.clone()
    labels[[1, 4]] = (pred[[1, 4]] + 1) % 12  # two misclassified images
    vvp = ValueVectorProjector(model)
    agree = vvp.attribute(x, target=labels, layer="attn", k=3).double()
    rates = vvp.key_value_agreement_rate(x, target=labels, layer="attn", k=3)
    ok = labels == pred
    torch.testing.assert_close(rates["image"], 100 * agree[:, :, 1:].mean(dim=(0, 2)))
    torch.testing.assert_close(rates["all"], 100 * agree.mean(dim=(0, 2)))
    torch.testing.assert_close(rates["cls"], 100 * agree[:, :, 0].mean(0))
    torch.testing.assert_close(rates["cls_incorrect"], 100 * agree[~ok, :, 0].mean(0))
    torch.testing.assert_close(rates["image_correct"], 100 * agree[ok][:, :, 1:].mean(dim=(0, 2)))
    assert int(rates["num_images"]) == 6 and int(rates["num_correct"]) == 4
    streamed = vvp.key_value_agreement_rate(make_loader(x, labels, batch_size=4), layer="attn", k=3)
    assert_rates_equal(streamed, rates)


def test_authors_class_mean_aggregation_differs_from_pooling(model) -> None:
    # unequal images per class: class 2 has 3 images, class 7 has 1, class 5 has 2
    x = images(6, seed=11)
    pred = predictions(model, x)
    labels = torch.tensor([2, 2, 2, 7, 5, 5])
    labels[0] = pred[0]  # one image whose label is its prediction (correct), if that is not class 2
    vvp = ValueVectorProjector(model)
    agree = vvp.attribute(x, target=labels, layer="mlp", k=3).double()  # (N, blocks, T)
    pooled = vvp.key_value_agreement_rate(x, target=labels, layer="mlp", k=3)
    by_class = vvp.key_value_agreement_rate(x, target=labels, layer="mlp", k=3, aggregate="classes")
    ok = labels == pred

    def class_mean(a: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        """Authors: per class, the share over all tokens of its images; then the mean over classes."""
        rates = [100 * a[select & (labels == c)].mean(dim=(0, 2)) for c in labels[select].unique()]
        return torch.stack(rates).mean(0)

    everyone = torch.ones(6, dtype=torch.bool)
    torch.testing.assert_close(by_class["all"], class_mean(agree, everyone))
    torch.testing.assert_close(by_class["image"], class_mean(agree[:, :, 1:], everyone))
    torch.testing.assert_close(by_class["cls_correct"], class_mean(agree[:, :, :1], ok))
    torch.testing.assert_close(by_class["image_incorrect"], class_mean(agree[:, :, 1:], ~ok))
    assert int(by_class["num_classes"]) == len(labels.unique()) and "num_classes" not in pooled
    # the pooled default is unchanged, and the two aggregations differ on this data
    torch.testing.assert_close(pooled["all"], 100 * agree.mean(dim=(0, 2)))
    assert (pooled["all"] - by_class["all"]).abs().max() > 0.5
    # equal images per class: the two agree
    even = torch.tensor([2, 2, 7, 7, 5, 5])
    a = vvp.key_value_agreement_rate(x, target=even, layer="mlp", k=3)
    b = vvp.key_value_agreement_rate(x, target=even, layer="mlp", k=3, aggregate="classes")
    torch.testing.assert_close(a["all"], b["all"])
    # streamed batches give the same per-class numbers
    streamed = vvp.key_value_agreement_rate(
        make_loader(x, labels, batch_size=4), layer="mlp", k=3, aggregate="classes"
    )
    assert_rates_equal(streamed, by_class)
    with pytest.raises(InputValidationError, match="aggregate"):
        vvp.key_value_agreement_rate(x, target=labels, aggregate="images")


def test_per_image_rates_for_the_correct_vs_incorrect_test(model) -> None:
    from captum_clsemb.stats import mann_whitney_u

    x = images(8, seed=2)
    pred = predictions(model, x)
    labels = pred.clone()
    labels[[0, 3, 5]] = (pred[[0, 3, 5]] + 1) % 12
    vvp = ValueVectorProjector(model)
    agree = vvp.attribute(x, target=labels, layer="attn", k=3).double()
    out = vvp.key_value_agreement_rate(
        make_loader(x, labels, batch_size=3), layer="attn", k=3, return_per_image=True
    )
    torch.testing.assert_close(out["per_image"]["image"], 100 * agree[:, :, 1:].mean(-1))
    torch.testing.assert_close(out["per_image"]["cls"], 100 * agree[:, :, 0])
    torch.testing.assert_close(out["per_image"]["all"], 100 * agree.mean(-1))
    assert torch.equal(out["correct"], labels == pred) and torch.equal(out["labels"], labels)
    # pooled image-token rate = mean of the per-image shares (same token count per image)
    torch.testing.assert_close(out["image"], out["per_image"]["image"].mean(0))
    per = out["per_image"]["image"].numpy()
    ok = out["correct"].numpy()
    res = mann_whitney_u(per[ok], per[~ok])
    assert res.n == 8 and len(res) == 3


def test_rates_exclude_register_tokens_and_handle_gap() -> None:
    model = randomized(TIMM_VARIANTS["registers"](), seed=4)
    x = images(2)
    vvp = ValueVectorProjector(model)
    agree = vvp.attribute(x, target=[0, 3], layer="mlp", k=2).double()
    rates = vvp.key_value_agreement_rate(x, target=[0, 3], layer="mlp", k=2)
    torch.testing.assert_close(rates["image"], 100 * agree[:, :, 5:].mean(dim=(0, 2)))  # cls + 4 registers
    gap = ValueVectorProjector(randomized(TIMM_VARIANTS["gap_fc_norm"](), seed=4))
    out = gap.key_value_agreement_rate(x, target=[0, 3], layer="mlp", k=2)
    assert "cls" not in out and torch.equal(out["image"], out["all"])


def test_compositionality_equals_direct_computation(model) -> None:
    x = images(3)
    vvp = ValueVectorProjector(model)
    states = hook_states(model, x)
    for layer in ("mlp", "attn"):
        ours = vvp.compositionality(x, layer=layer, k=4)
        direct_all, direct_cls = [], []
        for b, blk in enumerate(model.blocks):
            mem_top1 = (model.head.weight @ WEIGHTS[layer](blk)).argmax(0)
            top1 = lens(model, states[b][f"{layer}_out"]).argmax(-1)  # (N, T)
            keys = states[b][KEYS[layer]].topk(4, dim=-1).indices
            match = torch.tensor(
                [[int(top1[i, t]) in mem_top1[keys[i, t]].tolist() for t in range(17)] for i in range(3)]
            )
            direct_all.append(100 * match.double().mean())
            direct_cls.append(100 * match[:, 0].double().mean())
        torch.testing.assert_close(ours["all"], torch.stack(direct_all))
        torch.testing.assert_close(ours["cls"], torch.stack(direct_cls))
        streamed = vvp.compositionality(make_loader(x, torch.zeros(3, dtype=torch.long)), layer=layer, k=4)
        assert_rates_equal(streamed, ours)


def test_timm_and_hf_twins_agree(model) -> None:
    hf = timm_to_hf(model).eval()
    x = images(3)
    target = torch.tensor([2, 5, 9])
    a, b = ValueVectorProjector(model), ValueVectorProjector(hf)
    for layer in ("mlp", "attn"):
        torch.testing.assert_close(a.class_value_agreement(layer), b.class_value_agreement(layer))
        torch.testing.assert_close(a.value_projection(1, layer), b.value_projection(1, layer))
        assert torch.equal(a.attribute(x, target, layer=layer, k=3), b.attribute(x, target, layer=layer, k=3))
        assert_rates_equal(a.compositionality(x, layer=layer, k=3), b.compositionality(x, layer=layer, k=3))


def test_random_baseline_timm() -> None:
    model = small_timm(num_classes=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    vvp = ValueVectorProjector(model)
    r1, r2, r3 = vvp.random_baseline(0), vvp.random_baseline(0), vvp.random_baseline(1)
    assert torch.equal(torch.get_rng_state(), rng)  # global RNG untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    m1, m3 = r1.adapter.model, r3.adapter.model
    assert m1 is not model
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), r2.adapter.model.parameters()))
    assert not torch.equal(m1.blocks[0].mlp.fc1.weight, m3.blocks[0].mlp.fc1.weight)
    assert not torch.equal(m1.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight)
    # timm's ViT init: trunc-normal(0.02) linear weights, zero biases, unit LayerNorm
    w = torch.cat([blk.mlp.fc2.weight.flatten() for blk in m1.blocks])
    assert abs(w.std().item() - 0.02) < 0.003
    assert torch.equal(m1.blocks[1].attn.proj.bias, torch.zeros(32))
    assert torch.equal(m1.blocks[1].norm1.weight, torch.ones(32))
    assert r1.class_value_agreement("mlp").shape == (3, 12)


def test_random_baseline_timm_after_skip_init_uses_vit_init() -> None:
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, num_classes=7, embed_dim=32, depth=2, num_heads=4,
                              weight_init="skip")  # fmt: skip
    r = ValueVectorProjector(model).random_baseline(0).adapter.model
    w = torch.cat([blk.attn.qkv.weight.flatten() for blk in r.blocks])
    assert abs(w.std().item() - 0.02) < 0.003  # not PyTorch's default kaiming-uniform reset
    assert r.weight_init_mode == "" and model.weight_init_mode == "reset"


def test_random_baseline_hf() -> None:
    model = randomized(small_hf(num_labels=12), seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = ValueVectorProjector(model).random_baseline(0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    rm = r.adapter.model
    w = torch.cat([r.adapter.block(b).fc2.weight.flatten() for b in range(3)])
    assert abs(w.std().item() - model.config.initializer_range) < 0.003
    assert torch.equal(r.adapter.block(0).fc2.bias, torch.zeros(32))
    assert torch.equal(rm.vit.layernorm.weight, torch.ones(32))
    again = ValueVectorProjector(model).random_baseline(0).adapter.model
    assert all(torch.equal(p, q) for p, q in zip(rm.parameters(), again.parameters()))
    with pytest.raises(InputValidationError, match="timm"):
        ValueVectorProjector(model).random_baseline(0, init_mode="jax")


def test_input_errors(model) -> None:
    vvp = ValueVectorProjector(model)
    with pytest.raises(InputValidationError, match="k must be"):
        vvp.attribute(images(1), target=0, k=0)
    with pytest.raises(InputValidationError, match="variant"):
        vvp.attribute(images(1), target=0, variant="other")
    with pytest.raises(InputValidationError, match="iterable"):
        vvp.key_value_agreement_rate(make_loader(images(2), torch.zeros(2, dtype=torch.long)), target=0)
    with pytest.raises(InputValidationError, match="no images"):
        vvp.key_value_agreement_rate([])
