"""Adapters: exact reproduction of model logits for every supported family, and structure."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from conftest import (
    HF_VARIANTS,
    TIMM_REAL,
    TIMM_VARIANTS,
    images,
    model_logits,
    real_timm,
    small_hf,
    small_timm,
)

from captum_clsemb import UnsupportedModelError
from captum_clsemb.adapters import HFViTAdapter, TimmViTAdapter, adapt
from captum_clsemb.trace import trace

ATOL = 1e-5


@pytest.mark.parametrize("name", sorted(TIMM_VARIANTS) + sorted(HF_VARIANTS))
def test_decomposed_forward_reproduces_logits_small(name: str) -> None:
    model = {**TIMM_VARIANTS, **HF_VARIANTS}[name]()
    x = images(4)
    ref = model_logits(model, x)
    out = trace(model, x).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TIMM_REAL)
def test_decomposed_forward_reproduces_logits_real_timm(name: str) -> None:
    model = real_timm(name)
    adapter = adapt(model)
    x = torch.randn(2, 3, *adapter.img_size, generator=torch.Generator().manual_seed(0))
    ref = model_logits(model, x)
    torch.testing.assert_close(trace(model, x).logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cls_name", ["vit", "deit", "deit_teacher"])
def test_decomposed_forward_reproduces_logits_real_hf_base(cls_name: str) -> None:
    # ViT-B/16 sized configuration (the transformers defaults), random weights.
    torch.manual_seed(0)
    if cls_name == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).eval()
    elif cls_name == "deit":
        model = transformers.DeiTForImageClassification(transformers.DeiTConfig(num_labels=1000)).eval()
    else:
        model = transformers.DeiTForImageClassificationWithTeacher(
            transformers.DeiTConfig(num_labels=1000)
        ).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(trace(model, x).logits, model_logits(model, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(TIMM_VARIANTS) + sorted(HF_VARIANTS) + ["qk_norm"])
def test_qkv_is_projection_means_the_heads_of_the_projection(name: str) -> None:
    """Where a block says ``qkv_is_projection``, (q, k, v) are the heads of ``u W^T + b`` (LRP reads the
    projection back from them); a q/k norm makes it False."""
    model = small_timm(qk_norm=True) if name == "qk_norm" else {**TIMM_VARIANTS, **HF_VARIANTS}[name]()
    adapter = adapt(model)
    parts = adapter.block(1)
    assert parts.qkv_is_projection is (name != "qk_norm")
    u = torch.randn(2, 5, adapter.embed_dim)
    q, k, v = parts.qkv(u)
    flat = torch.cat([t.transpose(1, 2).reshape(2, 5, -1) for t in (q, k, v)], -1)
    projection = torch.nn.functional.linear(u, parts.qkv_weight, parts.qkv_bias)
    if parts.qkv_is_projection:
        torch.testing.assert_close(flat, projection, atol=1e-6, rtol=0)
    else:
        assert not torch.allclose(flat, projection, atol=1e-3)


def test_structure_timm_variants() -> None:
    a = adapt(small_timm())
    assert isinstance(a, TimmViTAdapter)
    assert (a.num_blocks, a.num_heads, a.head_dim, a.embed_dim, a.num_classes) == (3, 4, 8, 32, 7)
    assert (
        a.prefix_tokens == ("cls",) and a.grid_size == (4, 4) and a.num_tokens == 17 and a.pooling == "token"
    )
    assert adapt(TIMM_VARIANTS["registers"]()).prefix_tokens == ("cls", "reg", "reg", "reg", "reg")
    assert adapt(TIMM_VARIANTS["distilled"]()).prefix_tokens == ("cls", "dist")
    gap = adapt(TIMM_VARIANTS["gap_fc_norm"]())
    assert gap.prefix_tokens == () and gap.pooling == "avg" and not gap.has_class_token
    assert adapt(TIMM_VARIANTS["registers_gap"]()).prefix_tokens == ("reg", "reg")
    real = adapt(real_timm("vit_base_patch32_224"))
    assert (real.num_blocks, real.num_heads, real.grid_size, real.num_classes) == (12, 12, (7, 7), 1000)
    # E is the head weight; adapting returns the same adapter for an adapter.
    assert a.class_embedding is a.model.head.weight and a.class_bias is a.model.head.bias
    assert adapt(a) is a


def test_structure_hf() -> None:
    a = adapt(small_hf("deit_teacher"))
    assert isinstance(a, HFViTAdapter)
    assert a.prefix_tokens == ("cls", "dist") and a.head_dist is a.model.distillation_classifier
    v = adapt(
        small_hf("vit", id2label={i: f"c{i}" for i in range(7)}, label2id={f"c{i}": i for i in range(7)})
    )
    assert v.class_names == [f"c{i}" for i in range(7)]
    assert adapt(small_hf("vit")).class_names is None  # LABEL_i placeholders are not names


def test_projected_final_class_token_equals_logits() -> None:
    for build in (TIMM_VARIANTS["cls_token"], TIMM_VARIANTS["layer_scale"], HF_VARIANTS["hf_vit"]):
        model = build()
        x = images(3)
        tr = trace(model, x, record=["resid_post"])
        adapter = adapt(model)
        cls = tr.cache["resid_post", -1][:, adapter.class_token_index]
        torch.testing.assert_close(adapter.project(cls), model_logits(model, x), atol=ATOL, rtol=0)


def test_distilled_lens_mean_of_heads_equals_logits() -> None:
    for build in (TIMM_VARIANTS["distilled"], HF_VARIANTS["hf_deit_teacher"]):
        model = build()
        x = images(3)
        adapter = adapt(model)
        last = trace(model, x, record=["resid_post"]).cache["resid_post", -1]
        recon = (adapter.project(last[:, 0], head="cls") + adapter.project(last[:, 1], head="dist")) / 2
        torch.testing.assert_close(recon, model_logits(model, x), atol=ATOL, rtol=0)


def test_gap_lens_per_token_averages_to_logits_when_fc_norm_is_identity() -> None:
    # With the final norm before pooling and no fc_norm, the head is affine, so the mean of
    # the per-token lens logits equals the model's logits: a closed-form check of the lens.
    model = real_timm("vit_medium_patch16_gap_256")
    adapter = adapt(model)
    x = torch.randn(1, 3, 256, 256)
    last = trace(model, x, record=["resid_post"]).cache["resid_post", -1]
    torch.testing.assert_close(adapter.project(last).mean(1), model_logits(model, x), atol=ATOL, rtol=0)


def test_lens_options() -> None:
    model = small_timm()
    adapter = adapt(model)
    s = torch.randn(2, 5, 32)
    no_bias = adapter.project(s, include_bias=False)
    torch.testing.assert_close(adapter.project(s) - no_bias, model.head.bias.expand_as(no_bias))
    torch.testing.assert_close(
        adapter.project(s, apply_norm=False, include_bias=False), s @ model.head.weight.T
    )


@pytest.mark.parametrize(
    "factory",
    [
        lambda: torch.nn.Linear(3, 4),
        lambda: timm.create_model("resnet18", pretrained=False),
        lambda: small_timm(global_pool="map"),  # attention pooling
        lambda: small_timm(num_classes=0),
        lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False),
    ],
)
def test_unsupported_models_raise_naming_class_and_families(factory) -> None:
    model = factory()
    with pytest.raises(UnsupportedModelError) as err:
        adapt(model)
    msg = str(err.value)
    assert type(model).__name__ in msg and "Supported" in msg


def test_unsupported_forward_function() -> None:
    with pytest.raises(UnsupportedModelError, match="Pass the model itself"):
        adapt(lambda x: x)
