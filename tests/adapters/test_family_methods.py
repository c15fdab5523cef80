"""Every analysis on every family: identifiability, value vectors, token removal, explanations."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_VARIANTS, images

from captum_clsemb import (
    AttentionRollout,
    BlockwiseIdentifiability,
    CheferGradientRollout,
    ClassEmbeddingGradient,
    InputValidationError,
    RawAttention,
    ValueVectorProjector,
    token_removal_auc,
)
from captum_clsemb.adapters import adapt
from captum_clsemb.adapters.base import LayerScale, identity
from captum_clsemb.trace import trace

NAMES = sorted(FAMILY_VARIANTS)
WITH_CLASS_TOKEN = [n for n in NAMES if n not in ("vit_rope_reg_gap", "siglip_zero_shot")]


@pytest.fixture(scope="module", params=NAMES)
def family(request) -> tuple[str, torch.nn.Module]:
    return request.param, FAMILY_VARIANTS[request.param]()


def _fc2_and_gain(model: torch.nn.Module, b: int) -> tuple[torch.nn.Linear, torch.Tensor | None]:
    """The second MLP linear of block b and its layer-scale gain, read from the model's own modules."""
    name = type(model).__name__
    if name in ("Eva", "Beit"):
        blk = model.blocks[b]
        return blk.mlp.fc2, getattr(blk, "gamma_2", None)
    if name == "BeitForImageClassification":
        layer = model.beit.layers[b]
        return layer.mlp.fc2, layer.lambda_2 if isinstance(layer.lambda_2, torch.Tensor) else None
    if name.startswith("Dinov2"):
        backbone = model.dinov2 if name == "Dinov2ForImageClassification" else model.dinov2_with_registers
        layer = backbone.encoder.layer[b]
        return getattr(layer.mlp, "fc2", None) or layer.mlp.down_proj, layer.layer_scale2.lambda1
    return model.model.vision_model.encoder.layers[b].mlp.fc2, None  # zero-shot CLIP / SigLIP


def test_identifiability_is_the_rank_of_the_target_through_the_lens(family) -> None:
    name, model = family
    adapter = adapt(model)
    x = images(3)
    target = torch.tensor([0, 3, 6])
    scores = BlockwiseIdentifiability(model).attribute(x, target=target)
    assert scores.shape == (3, adapter.num_blocks, adapter.num_tokens)
    tr = trace(model, x, record=["resid_post"])
    for b in (0, adapter.num_blocks - 1):
        logits = adapter.project(tr.cache["resid_post", b])  # (N, T, C)
        rank = (logits > logits.gather(-1, target[:, None, None].expand(-1, logits.shape[1], 1))).sum(-1)
        torch.testing.assert_close(scores[:, b], 1 - rank.float() / adapter.num_classes)
    assert 0 < scores.mean() < 1


def test_value_vectors_are_fc2_columns_times_layer_scale(family) -> None:
    name, model = family
    adapter = adapt(model)
    vvp = ValueVectorProjector(model)
    for b in range(adapter.num_blocks):
        fc2, gain = _fc2_and_gain(model, b)
        expected = fc2.weight.detach().t() * (1 if gain is None else gain.detach())
        torch.testing.assert_close(vvp.value_vectors(b, "mlp"), expected)
    # sum_j key_j * v_j (+ the scaled fc2 bias) is the MLP output, also for SwiGLU / GLU keys,
    # where the MLP has no norm between the keys and fc2
    tr = trace(model, images(2), record=["mlp_keys", "mlp_out"])
    for b in range(adapter.num_blocks):
        parts = adapter.block(b)
        if not (parts.mlp_mid_norm is identity or isinstance(parts.mlp_mid_norm, torch.nn.Identity)):
            continue  # a norm between the keys and fc2 (EVA-02 scale_mlp)
        if not (parts.mlp_post is identity or isinstance(parts.mlp_post, LayerScale)):
            continue  # a post-norm block normalises the MLP output
        fc2, gain = _fc2_and_gain(model, b)
        bias = fc2.bias * (1 if gain is None else gain)
        recon = tr.cache["mlp_keys", b] @ vvp.value_vectors(b, "mlp") + bias
        torch.testing.assert_close(recon, tr.cache["mlp_out", b], atol=1e-5, rtol=1e-5)
    agree = vvp.class_value_agreement("mlp")
    assert agree.shape == (adapter.num_blocks, adapter.num_classes) and agree.abs().max() <= 1
    kv = vvp.attribute(images(2), layer="mlp", k=3)
    assert kv.shape == (2, adapter.num_blocks, adapter.num_tokens) and kv.dtype == torch.bool
    assert vvp.attribute(images(2), layer="attn", k=3).shape == kv.shape
    base = vvp.random_baseline(seed=0)
    assert not torch.equal(base.value_vectors(0, "mlp"), vvp.value_vectors(0, "mlp"))
    assert base.class_value_agreement("mlp").shape == agree.shape
    assert not any(p is q for p, q in zip(base.adapter.model.parameters(), model.parameters()))


def test_token_removal_runs_on_every_family(family) -> None:
    name, model = family
    adapter = adapt(model)
    x = images(3)
    attr = torch.rand(3, adapter.num_patches, generator=torch.Generator().manual_seed(0))
    auc, curves = token_removal_auc(model, x, attr, fractions=[0.0, 0.25, 0.5, 0.75], return_curve=True)
    assert auc.shape == (3,) and curves.shape == (3, 4)
    assert (curves[:, 0] == 1).all()  # nothing removed: the prediction is the target
    assert ((auc >= 0) & (auc <= 75)).all()
    # the curve's last point is the accuracy of the model on the kept quarter, computed here
    keep = attr.argsort(dim=1, descending=True, stable=True)[:, : adapter.num_patches // 4]
    kept_pred = trace(model, x, keep_tokens=keep).logits.argmax(-1)
    clean_pred = trace(model, x).logits.argmax(-1)
    assert torch.equal(curves[:, -1], (kept_pred == clean_pred).float())


@pytest.mark.parametrize("name", WITH_CLASS_TOKEN)
def test_class_embedding_gradient_of_the_last_block_is_the_lens_gradient(name: str) -> None:
    model = FAMILY_VARIANTS[name]()
    adapter = adapt(model)
    x = images(2)
    attr = ClassEmbeddingGradient(model).attribute(x, blocks=-1)  # (N, 1, h, w)
    # independent: autograd of log softmax(lens(final class token)) w.r.t. the last block's
    # attention probabilities of the class-token row, summed over heads
    tr = trace(model, x, record=["attn_probs", "resid_post"], grad=True)
    cls, p = adapter.class_token_index, adapter.num_prefix_tokens
    target = tr.logits.argmax(-1)
    logp = adapter.project(tr.cache["resid_post", -1][:, cls]).log_softmax(-1)
    probs = tr.cache["attn_probs", -1]
    (grad,) = torch.autograd.grad(logp.gather(1, target[:, None]).sum(), probs)
    expected = grad[:, :, cls, p:].sum(1).reshape(2, 1, *adapter.grid_size)
    torch.testing.assert_close(attr, expected, atol=1e-5, rtol=1e-4)
    assert attr.abs().max() > 0


@pytest.mark.parametrize("name", WITH_CLASS_TOKEN)
def test_attention_explanations_run_on_class_token_families(name: str) -> None:
    model = FAMILY_VARIANTS[name]()
    adapter = adapt(model)
    x = images(2)
    h, w = adapter.grid_size
    for method in (CheferGradientRollout(model), AttentionRollout(model), RawAttention(model)):
        out = method.attribute(x)
        assert out.shape == (2, 1, h, w) and torch.isfinite(out).all()
        assert out.flatten(1).std(1).min() > 0  # a map, not a constant
    # raw attention of the last block is the class-token row of the traced probabilities
    probs = trace(model, x, record=["attn_probs"]).cache["attn_probs", -1]
    row = probs[:, :, adapter.class_token_index, adapter.num_prefix_tokens :].mean(1)
    torch.testing.assert_close(RawAttention(model).attribute(x).flatten(1), row)


@pytest.mark.parametrize("name", ["vit_rope_reg_gap", "siglip_zero_shot"])
def test_class_token_explanations_refuse_models_without_one(name: str) -> None:
    model = FAMILY_VARIANTS[name]()
    for cls in (ClassEmbeddingGradient, CheferGradientRollout, AttentionRollout, RawAttention):
        with pytest.raises(InputValidationError, match="no class token"):
            cls(model).attribute(images(1))
