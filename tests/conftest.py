"""Shared model builders: randomly initialised models of real architectures (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
import transformers
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

SHARED_DATA = Path(
    os.environ.get("CLSEMB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)

SMALL = dict(img_size=32, patch_size=8, num_classes=7, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0)


def small_timm(**overrides) -> torch.nn.Module:
    """A small timm ViT (16 patches) with a given variant; random weights, eval mode."""
    torch.manual_seed(0)
    kw = {**SMALL, **overrides}
    cls = kw.pop("cls", VisionTransformer)
    return cls(**kw).eval()


# Small versions of every supported timm variant.
TIMM_VARIANTS = {
    "cls_token": lambda: small_timm(),
    "gap_fc_norm": lambda: small_timm(global_pool="avg", class_token=False),
    "gap_respost": lambda: small_timm(
        global_pool="avg", class_token=False, block_fn=ResPostBlock, init_values=0.5
    ),
    "gap_with_cls": lambda: small_timm(global_pool="avg"),
    "registers": lambda: small_timm(reg_tokens=4),
    "registers_gap": lambda: small_timm(reg_tokens=2, class_token=False, global_pool="avg"),
    "layer_scale": lambda: small_timm(init_values=0.3),
    "no_qkv_bias": lambda: small_timm(qkv_bias=False),
    "no_embed_class": lambda: small_timm(no_embed_class=True, init_values=0.3),
    "distilled": lambda: small_timm(cls=VisionTransformerDistilled),
}

# Real architectures from the timm registry (random weights).
TIMM_REAL = [
    "vit_base_patch32_224",
    "vit_base_patch16_rpn_224",
    "deit_tiny_distilled_patch16_224",
    "vit_base_patch16_224_miil",
    "vit_small_patch16_224",
    "vit_medium_patch16_gap_256",
    "vit_base_patch16_reg4_gap_256",
    "deit3_small_patch16_224",
]


def real_timm(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def small_hf(kind: str = "vit", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=64, num_labels=7, layer_norm_eps=1e-6)  # fmt: skip
    kw.update(overrides)
    if kind == "vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(**kw)).eval()
    cfg = transformers.DeiTConfig(**kw)
    if kind == "deit":
        return transformers.DeiTForImageClassification(cfg).eval()
    return transformers.DeiTForImageClassificationWithTeacher(cfg).eval()


HF_VARIANTS = {
    "hf_vit": lambda: small_hf("vit"),
    "hf_vit_no_qkv_bias": lambda: small_hf("vit", qkv_bias=False),
    "hf_deit": lambda: small_hf("deit"),
    "hf_deit_teacher": lambda: small_hf("deit_teacher"),
}


def images(n: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def model_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = (
            model(x) if not isinstance(model, transformers.PreTrainedModel) else model(pixel_values=x).logits
        )
    return out


def needs_shared_data() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is absent")
