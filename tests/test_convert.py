"""timm <-> Hugging Face conversion: equal logits, strict weight copy, clear errors."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch import nn

from captum_clsemb.convert import UnsupportedConversionError, _hf_parameter_map, hf_to_timm, timm_to_hf

SMALL_VIT = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=7)
ATOL = 1e-5


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    r"""Give every parameter random values (init leaves biases at 0 and LayerNorm at 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def _inputs(model: nn.Module, batch: int = 3) -> torch.Tensor:
    height, width = model.patch_embed.img_size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def _max_logit_diff(timm_model: nn.Module, hf_model: nn.Module) -> float:
    pixels = _inputs(timm_model)
    with torch.no_grad():
        return (timm_model(pixels) - hf_model(pixel_values=pixels).logits).abs().max().item()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"qkv_bias": False},
        {"no_embed_class": True},
        {"proj_bias": False, "act_layer": "gelu_tanh"},
        {"pos_embed": "none"},
        {"img_size": (32, 48)},
    ],
    ids=["default", "no_qkv_bias", "no_embed_class", "no_proj_bias_tanh_gelu", "no_pos_embed", "non_square"],
)
def test_vit_logits_match(kwargs: dict) -> None:
    timm_model = _randomize(VisionTransformer(**{**SMALL_VIT, **kwargs})).eval()
    hf_model = timm_to_hf(timm_model)
    assert isinstance(hf_model, transformers.ViTForImageClassification)
    assert not hf_model.training
    assert _max_logit_diff(timm_model, hf_model) < ATOL
    assert hf_model.config.qkv_bias == kwargs.get("qkv_bias", True)


def test_timm_registry_model_and_config() -> None:
    timm_model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4
    ).eval()
    hf_model = timm_to_hf(timm_model, class_names=[f"class{i}" for i in range(10)])
    config = hf_model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (192, 12, 3)
    assert (config.intermediate_size, config.image_size, config.patch_size) == (768, 32, 4)
    assert config.layer_norm_eps == pytest.approx(1e-6)
    assert config.hidden_act == "gelu"
    assert config.num_labels == 10
    assert config.id2label[3] == "class3" and config.label2id["class3"] == 3
    assert _max_logit_diff(timm_model, hf_model) < ATOL


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_distilled_deit_logits_match(qkv_bias: bool) -> None:
    timm_model = _randomize(VisionTransformerDistilled(**SMALL_VIT, qkv_bias=qkv_bias)).eval()
    hf_model = timm_to_hf(timm_model)
    assert isinstance(hf_model, transformers.DeiTForImageClassificationWithTeacher)
    assert _max_logit_diff(timm_model, hf_model) < ATOL
    pixels = _inputs(timm_model)
    with torch.no_grad():
        features = timm_model.forward_features(pixels)
        outputs = hf_model(pixel_values=pixels)
    torch.testing.assert_close(outputs.cls_logits, timm_model.head(features[:, 0]), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        outputs.distillation_logits, timm_model.head_dist(features[:, 1]), atol=ATOL, rtol=0
    )


def test_eager_attention_and_no_head() -> None:
    timm_model = _randomize(VisionTransformer(**{**SMALL_VIT, "num_classes": 0})).eval()
    hf_model = timm_to_hf(timm_model, attn_implementation="eager")
    assert hf_model.config._attn_implementation == "eager"
    pixels = _inputs(timm_model)
    with torch.no_grad():
        outputs = hf_model(pixel_values=pixels, output_attentions=True)
        torch.testing.assert_close(outputs.logits, timm_model(pixels), atol=ATOL, rtol=0)
    assert len(outputs.attentions) == SMALL_VIT["depth"]


def test_train_mode_is_preserved() -> None:
    timm_model = VisionTransformer(**SMALL_VIT).train()
    hf_model = timm_to_hf(timm_model)
    assert hf_model.training and all(module.training for module in hf_model.modules())
    assert not timm_to_hf(timm_model.eval()).training


@pytest.mark.parametrize("distilled", [False, True])
def test_round_trip_hf_to_timm(distilled: bool) -> None:
    timm_class = VisionTransformerDistilled if distilled else VisionTransformer
    timm_model = _randomize(timm_class(**SMALL_VIT)).eval()
    round_trip = hf_to_timm(timm_to_hf(timm_model))
    assert type(round_trip) is timm_class and not round_trip.training
    original_state, new_state = timm_model.state_dict(), round_trip.state_dict()
    assert original_state.keys() == new_state.keys()
    for name, tensor in original_state.items():
        torch.testing.assert_close(new_state[name], tensor, atol=0, rtol=0, msg=name)
    pixels = _inputs(timm_model)
    with torch.no_grad():
        torch.testing.assert_close(round_trip(pixels), timm_model(pixels), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "feature"),
    [
        ({"global_pool": "avg"}, "global_pool='avg'"),
        ({"global_pool": "map"}, "global_pool='map'"),
        ({"reg_tokens": 2}, "register tokens"),
        ({"class_token": False, "global_pool": "avg"}, "class token"),
        ({"init_values": 1e-5}, "layer scale"),
        ({"block_fn": ResPostBlock}, "ResPostBlock"),
        ({"qk_norm": True}, "qk_norm"),
        ({"pre_norm": True}, "pre-norm"),
        ({"fc_norm": True}, "fc_norm"),
        ({"final_norm": False}, "final norm"),
        ({"act_layer": "silu"}, "activation SiLU"),
        ({"norm_layer": "rmsnorm"}, "RmsNorm"),
    ],
)
def test_unsupported_configs_raise(kwargs: dict, feature: str) -> None:
    timm_model = VisionTransformer(**{**SMALL_VIT, **kwargs})
    with pytest.raises(ValueError, match="cannot convert") as error_info:
        timm_to_hf(timm_model)
    assert isinstance(error_info.value, UnsupportedConversionError)
    assert feature in str(error_info.value)


def test_non_vit_raises() -> None:
    with pytest.raises(ValueError, match="model class"):
        timm_to_hf(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model class"):
        hf_to_timm(nn.Linear(2, 2))


def test_class_names_length_checked() -> None:
    with pytest.raises(ValueError, match="class names"):
        timm_to_hf(VisionTransformer(**SMALL_VIT), class_names=["a", "b"])


class _FakeConfig:
    num_hidden_layers = 1


class _Named(nn.Module):
    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def _transformers4_style_model(dim: int = 8, mlp_dim: int = 16) -> nn.Module:
    r"""A module tree with the transformers 4.x ViT names (``attention.attention.query`` ...)."""
    embeddings = _Named(patch_embeddings=_Named(projection=nn.Conv2d(3, dim, 4, 4)))
    embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    embeddings.position_embeddings = nn.Parameter(torch.zeros(1, 5, dim))
    layer = _Named(
        attention=_Named(
            attention=_Named(query=nn.Linear(dim, dim), key=nn.Linear(dim, dim), value=nn.Linear(dim, dim)),
            output=_Named(dense=nn.Linear(dim, dim)),
        ),
        intermediate=_Named(dense=nn.Linear(dim, mlp_dim)),
        output=_Named(dense=nn.Linear(mlp_dim, dim)),
        layernorm_before=nn.LayerNorm(dim),
        layernorm_after=nn.LayerNorm(dim),
    )
    vit = _Named(
        embeddings=embeddings, encoder=_Named(layer=nn.ModuleList([layer])), layernorm=nn.LayerNorm(dim)
    )
    model = _Named(vit=vit, classifier=nn.Linear(dim, 3))
    model.config = _FakeConfig()
    model.base_model_prefix = "vit"
    return model


def test_parameter_map_handles_transformers4_names() -> None:
    names = _hf_parameter_map(_transformers4_style_model())
    assert names["layers.0.q.weight"] == "vit.encoder.layer.0.attention.attention.query.weight"
    assert names["layers.0.v.bias"] == "vit.encoder.layer.0.attention.attention.value.bias"
    assert names["layers.0.o.weight"] == "vit.encoder.layer.0.attention.output.dense.weight"
    assert names["layers.0.fc1.weight"] == "vit.encoder.layer.0.intermediate.dense.weight"
    assert names["layers.0.fc2.weight"] == "vit.encoder.layer.0.output.dense.weight"
    assert names["layers.0.norm1.weight"] == "vit.encoder.layer.0.layernorm_before.weight"
    assert names["layers.0.norm2.bias"] == "vit.encoder.layer.0.layernorm_after.bias"
    assert names["norm.weight"] == "vit.layernorm.weight"
    assert names["patch.weight"] == "vit.embeddings.patch_embeddings.projection.weight"
    assert names["head.weight"] == "classifier.weight"
