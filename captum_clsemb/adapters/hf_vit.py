"""Adapter for Hugging Face ``ViTForImageClassification`` and the DeiT classification models."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from captum_clsemb.adapters.base import BlockParts, ModelAdapter, identity
from captum_clsemb.errors import UnsupportedModelError

SUPPORTED = "Hugging Face ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher"
_CLASSES = (
    "ViTForImageClassification",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
)


def is_hf_vit(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel) and type(model).__name__ in _CLASSES


def _first_attr(obj: object, *paths: str) -> object:
    """First dotted attribute path that exists (transformers renamed modules across 4.x/5.x)."""
    for path in paths:
        cur = obj
        try:
            for part in path.split("."):
                cur = getattr(cur, part)
        except AttributeError:
            continue
        return cur
    raise AttributeError(paths[0])


class HFViTAdapter(ModelAdapter):
    r"""Decomposed view of Hugging Face ViT / DeiT image classifiers (transformers 4.48+ and 5.x)."""

    family = "hf"

    def __init__(self, model: nn.Module) -> None:
        name = type(model).__name__
        if name not in _CLASSES:
            raise UnsupportedModelError(
                f"{name} is not supported. Supported Hugging Face models: {SUPPORTED}."
            )
        self.model = model
        self._backbone = model.vit if name == "ViTForImageClassification" else model.deit
        cfg = model.config
        self._teacher = name == "DeiTForImageClassificationWithTeacher"
        if self._teacher:
            self._head, self._head_dist = model.cls_classifier, model.distillation_classifier
        else:
            self._head, self._head_dist = model.classifier, None
        if not isinstance(self._head, nn.Linear):
            raise UnsupportedModelError(f"{name} without a linear classifier (num_labels=0) is not supported")
        try:
            self._layers = list(_first_attr(self._backbone, "layers", "encoder.layer"))
        except AttributeError as e:
            raise UnsupportedModelError(
                f"{name}: could not find the encoder layers in this transformers version"
            ) from e
        self.prefix_tokens = ("cls", "dist") if name.startswith("DeiT") else ("cls",)
        self.pooling = "token"
        self.num_blocks = len(self._layers)
        self.num_heads = cfg.num_attention_heads
        self.embed_dim = cfg.hidden_size
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_classes = self._head.out_features
        id2label = getattr(cfg, "id2label", None) or {}
        names = [id2label.get(i, id2label.get(str(i))) for i in range(self.num_classes)]
        self.class_names = (
            names
            if all(n is not None for n in names) and names != [f"LABEL_{i}" for i in range(self.num_classes)]
            else None
        )
        # Validate that every layer has the parts we decompose.
        for i in range(self.num_blocks):
            try:
                self._parts(i)
            except AttributeError as e:
                raise UnsupportedModelError(
                    f"{name}: layer {i} does not have the standard ViT structure ({e})"
                ) from e

    def _size(self, value: object) -> tuple[int, int]:
        return tuple(value) if isinstance(value, (tuple, list)) else (int(value), int(value))

    @property
    def img_size(self) -> tuple[int, int]:
        return self._size(self.model.config.image_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return self._size(self.model.config.patch_size)

    @property
    def in_chans(self) -> int:
        return self.model.config.num_channels

    @property
    def head(self) -> nn.Linear:
        return self._head

    @property
    def head_dist(self) -> nn.Linear | None:
        return self._head_dist

    def pre_pool_norm(self, states: Tensor) -> Tensor:
        return self._backbone.layernorm(states)

    def post_pool_norm(self, pooled: Tensor) -> Tensor:
        return pooled

    def embed(self, pixel_values: Tensor) -> Tensor:
        return self._backbone.embeddings(pixel_values)

    def model_logits(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).logits

    def _parts(self, index: int) -> tuple:
        layer = self._layers[index]
        q = _first_attr(layer, "attention.q_proj", "attention.attention.query")
        k = _first_attr(layer, "attention.k_proj", "attention.attention.key")
        v = _first_attr(layer, "attention.v_proj", "attention.attention.value")
        o = _first_attr(layer, "attention.o_proj", "attention.output.dense")
        fc1 = _first_attr(layer, "mlp.fc1", "intermediate.dense")
        act = _first_attr(layer, "mlp.activation_fn", "intermediate.intermediate_act_fn")
        fc2 = _first_attr(layer, "mlp.fc2", "output.dense")
        return layer, q, k, v, o, fc1, act, fc2

    def block(self, index: int) -> BlockParts:
        layer, q_lin, k_lin, v_lin, o_lin, fc1, act, fc2 = self._parts(index)
        heads, hd = self.num_heads, self.head_dim

        def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            b, t, _ = x.shape

            def split(lin: nn.Linear) -> Tensor:
                return lin(x).view(b, t, heads, hd).transpose(1, 2)

            return split(q_lin), split(k_lin), split(v_lin)

        return BlockParts(
            norm1=layer.layernorm_before,
            qkv=qkv,
            scale=hd**-0.5,
            attn_out_norm=identity,
            proj=o_lin,
            attn_post=identity,
            norm2=layer.layernorm_after,
            fc1=fc1,
            act=act,
            mlp_mid_norm=identity,
            fc2=fc2,
            mlp_post=identity,
            scale_before_matmul=False,
            qkv_weight=torch.cat([q_lin.weight, k_lin.weight, v_lin.weight], 0),
            qkv_is_projection=True,
            qkv_bias=None if q_lin.bias is None else torch.cat([q_lin.bias, k_lin.bias, v_lin.bias], 0),
        )
