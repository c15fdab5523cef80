"""Several models in one study: depth resampling (closed forms), per-image records against the
attribution and the streamed dataset numbers, trained-vs-random tests against direct scipy calls."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import images, small_hf, small_timm
from mech_helpers import make_loader, randomized
from scipy import stats as st

from captum_clsemb import InputValidationError, load_demo_model
from captum_clsemb.adapters import adapt
from captum_clsemb.analysis import (
    ValueVectorProjector,
    compare_models,
    depth_weights,
    per_image_identifiability,
    random_init_copy,
    resample_depth,
)
from captum_clsemb.attr import BlockwiseIdentifiability
from captum_clsemb.demo import load_demo_images
from captum_clsemb.stream.identifiability import dataset_identifiability


def test_depth_resampling_closed_forms() -> None:
    v = np.random.default_rng(0).normal(size=(5, 24))
    # ViT-L: 24 blocks onto 12, exactly the mean of consecutive pairs
    np.testing.assert_array_equal(resample_depth(v, 12), (v[:, 0::2] + v[:, 1::2]) / 2)
    np.testing.assert_array_equal(resample_depth(v, 24), v)
    # 3 blocks onto 2 points: [0, 1/2] holds block 1 and half of block 2's [1/3, 2/3]
    np.testing.assert_allclose(depth_weights(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
    # 2 blocks onto 4 points: each block repeated
    np.testing.assert_array_equal(depth_weights(2, 4), [[1, 0], [1, 0], [0, 1], [0, 1]])
    w = depth_weights(12, 7)
    np.testing.assert_allclose(w.sum(1), 1.0)
    # linear: the resampled mean curve is the mean of the resampled curves
    np.testing.assert_allclose(resample_depth(v.mean(0), 7), resample_depth(v, 7).mean(0))
    with pytest.raises(InputValidationError, match="num_points"):
        depth_weights(12, 0)


def test_per_image_record_equals_attribution_and_streamed_numbers() -> None:
    model = randomized(small_timm(num_classes=5), seed=2)
    x = images(7, seed=3)
    labels = torch.tensor([0, 1, -1, 3, 4, -1, 2])  # -1: unknown, the prediction is scored
    rec = per_image_identifiability(
        model, make_loader(x, labels, batch_size=3), name="m", keep_token_scores=True
    )
    pred = model(x).argmax(-1)
    target = torch.where(labels >= 0, labels, pred)
    scores = BlockwiseIdentifiability(model).attribute(x, target=target).double()  # (N, B, T)
    img = scores[:, :, 1:]
    np.testing.assert_allclose(rec.image_mean, img.mean(2).numpy())
    np.testing.assert_allclose(rec.image_rate, 100 * (img == 1).double().mean(2).numpy())
    np.testing.assert_allclose(rec.cls_score, scores[:, :, 0].numpy())
    np.testing.assert_array_equal(rec.any_identifiable, (img[:, -1] == 1).any(1).numpy())
    np.testing.assert_array_equal(rec.labelled, (labels >= 0).numpy())
    np.testing.assert_array_equal(rec.correct, ((pred == labels) & (labels >= 0)).numpy())
    np.testing.assert_allclose(rec.token_scores, img.float().numpy())
    assert rec.num_images == 7 and rec.num_blocks == 3 and rec.num_classes == 5
    # the same numbers as the report's streamed dataset summary
    ds = dataset_identifiability(model, make_loader(x, labels, batch_size=4))
    row = rec.table_row(n_resamples=500)
    assert row["identifiability_rate_last_block_percent"].estimate == pytest.approx(
        ds["identifiability_rate_last_block_percent"]
    )
    assert row["images_with_identifiable_token_percent"].estimate == pytest.approx(
        ds["images_with_identifiable_token_percent"]
    )
    assert row["top1_accuracy_percent"].estimate == pytest.approx(100 * ds["top1_accuracy"])
    np.testing.assert_allclose(rec.image_mean.mean(0), ds["mean_identifiability_per_block"]["image tokens"])
    # tensor inputs with a target give the same record
    same = per_image_identifiability(model, x, target=target, internal_batch_size=2)
    np.testing.assert_allclose(same.image_mean, rec.image_mean)


def test_random_init_copy() -> None:
    model = randomized(small_timm(num_classes=12), seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    a, b, c = (
        random_init_copy(model, seed=0),
        random_init_copy(model, seed=0),
        random_init_copy(model, seed=1),
    )
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(a) is type(model) and not a.training
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    # the timm default init, as timm.create_model(..., pretrained=False)
    w = torch.cat([blk.mlp.fc1.weight.flatten() for blk in a.blocks])
    assert abs(w.std().item() - 0.02) < 0.003 and torch.equal(a.blocks[2].mlp.fc1.bias, torch.zeros(64))
    # ValueVectorProjector's baseline is this copy
    r = ValueVectorProjector(model).random_baseline(0).adapter.model
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), r.parameters()))
    hf = randomized(small_hf(num_labels=12), seed=5)
    h = random_init_copy(hf, seed=3)
    assert type(h) is type(hf) and h.config.to_dict() == hf.config.to_dict()
    w = torch.cat([adapt(h).block(b).fc2.weight.flatten() for b in range(3)])
    assert abs(w.std().item() - hf.config.initializer_range) < 0.003


def test_compare_models_curves_table_and_tests() -> None:
    deep = randomized(small_timm(num_classes=5, depth=4), seed=1, scale=0.2)
    shallow = randomized(small_timm(num_classes=5, depth=2), seed=2, scale=0.2)
    x = images(16, seed=4)
    y = torch.arange(16) % 5
    recs = [per_image_identifiability(m, x, target=y, name=n, keep_token_scores=True)
            for m, n in ((deep, "deep"), (shallow, "shallow"))]  # fmt: skip
    rnd = per_image_identifiability(
        random_init_copy(deep), x, target=y, name="deep, random", keep_token_scores=True
    )
    cmp = compare_models(recs, baselines={"deep": rnd}, n_resamples=500, seed=3)
    assert cmp.num_points == 2 and cmp.depth.tolist() == [0.5, 1.0]
    deep_rec = recs[0]
    # curves: the deep model's 4 blocks averaged in pairs, over images
    pairs = (deep_rec.image_mean[:, 0::2] + deep_rec.image_mean[:, 1::2]) / 2
    np.testing.assert_allclose(cmp.curves["deep"]["mean"]["image"], pairs.mean(0))
    np.testing.assert_allclose(cmp.curves["shallow"]["rate"]["image"], recs[1].image_rate.mean(0))
    ci = cmp.curve_ci["deep"]["mean"]["image"]
    assert ci.n == 16 and np.all(ci.low <= ci.estimate) and np.all(ci.estimate <= ci.high)
    # tests on the grid and per block equal the direct scipy calls on the paired per-image values
    r_pairs = (rnd.image_mean[:, 0::2] + rnd.image_mean[:, 1::2]) / 2
    grid = cmp.tests["deep"]["image"]
    for j in range(2):
        assert grid.p_value[j] == pytest.approx(
            st.wilcoxon(pairs[:, j], r_pairs[:, j], alternative="greater").pvalue
        )
    blocks = cmp.block_tests["deep"]["cls"]
    assert len(blocks) == 4
    for b in range(4):
        ref = st.wilcoxon(deep_rec.cls_score[:, b], rnd.cls_score[:, b], alternative="greater")
        assert blocks.p_value[b] == pytest.approx(ref.pvalue)
    assert "shallow" not in cmp.tests
    # Table 1 rows
    row = cmp.table[0]
    assert row["model"] == "deep" and row["num_blocks"] == 4
    assert row["identifiability_rate_last_block_percent"].estimate == pytest.approx(
        deep_rec.image_rate[:, -1].mean()
    )
    assert row["top1_accuracy_percent"].estimate == pytest.approx(100 * deep_rec.correct.mean())
    assert "random_init_identifiability_rate_last_block_percent" in row
    d = cmp.to_dict()
    assert d["tests_trained_vs_random_init"]["deep"]["image"]["test"] == "wilcoxon_signed_rank"
    assert d["table"][1]["model"] == "shallow"
    # the authors' unit: every token paired with the same token of the random model
    tok = compare_models({"deep": deep_rec}, baselines={"deep": rnd}, unit="tokens", n_resamples=200)
    t_deep = deep_rec.token_scores.transpose(0, 2, 1).reshape(-1, 4).astype(float)
    t_rnd = rnd.token_scores.transpose(0, 2, 1).reshape(-1, 4).astype(float)
    for b in range(4):
        ref = st.wilcoxon(t_deep[:, b], t_rnd[:, b], alternative="greater")
        assert tok.block_tests["deep"]["image"].p_value[b] == pytest.approx(ref.pvalue)
        assert tok.block_tests["deep"]["image"].n[b] <= 16 * 16
    # errors: other images, or token scores missing
    other = per_image_identifiability(random_init_copy(deep), x[:8], target=y[:8])
    with pytest.raises(InputValidationError, match="same images"):
        compare_models({"deep": deep_rec}, baselines={"deep": other})
    plain = per_image_identifiability(deep, x, target=y, name="deep")
    with pytest.raises(InputValidationError, match="keep_token_scores"):
        compare_models([plain], baselines={"deep": rnd}, unit="tokens")
    with pytest.raises(InputValidationError, match="unknown models"):
        compare_models([plain], baselines={"other": rnd})


def test_bundled_model_beats_its_random_init_copy() -> None:
    # the paper's claim on the bundled CIFAR-10 model: later blocks identify the class far
    # better than the same architecture with random weights (one-sided Wilcoxon per block)
    model = load_demo_model()
    x, y, _ = load_demo_images(max_per_class=5)
    trained = per_image_identifiability(model, x, target=y, name="demo")
    rnd = per_image_identifiability(random_init_copy(model, seed=0), x, target=y, name="demo, random")
    cmp = compare_models({"demo": trained}, baselines={"demo": rnd}, n_resamples=500)
    res = cmp.block_tests["demo"]["image"]
    print(
        "per-block p:", res.p_value, "rate:", cmp.table[0]["identifiability_rate_last_block_percent"].estimate
    )
    # the last two of the 6 blocks, on 50 images (observed p ~ 1e-5 and 1e-7)
    assert (res.p_value_adjusted[-2:] < 1e-3).all() and (res.effect_size[-2:] > 0.5).all()
    assert cmp.table[0]["top1_accuracy_percent"].estimate > 60
    rnd_rate = cmp.table[0]["random_init_identifiability_rate_last_block_percent"]
    assert rnd_rate.high < cmp.table[0]["identifiability_rate_last_block_percent"].low  # CIs apart


def test_timm_create_model_default_init_matches_copy_statistics() -> None:
    # a real architecture: the copy has timm's default init statistics, like create_model(pretrained=False)
    torch.manual_seed(0)
    real = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    copy = random_init_copy(randomized(real, seed=1, scale=0.5), seed=0)
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    for (n, p), (_, q) in zip(copy.named_parameters(), fresh.named_parameters()):
        assert p.shape == q.shape
        assert p.std().item() == pytest.approx(q.std().item(), rel=0.1, abs=1e-6), n
