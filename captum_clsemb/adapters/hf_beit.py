"""Adapter for Hugging Face ``BeitForImageClassification`` (BEiT, BEiT v2, Data2Vec-vision layout)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from captum_clsemb.adapters._parts import gather_pair_bias, scale_or_identity
from captum_clsemb.adapters.base import BlockParts, ModelAdapter, identity
from captum_clsemb.adapters.hf_vit import _first_attr
from captum_clsemb.errors import UnsupportedModelError

SUPPORTED = (
    "Hugging Face BeitForImageClassification (relative position bias per layer or shared, absolute "
    "position embedding, layer scale, mean pooling with the pooler layernorm or class-token pooling)"
)


def hf_size(value: object) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def hf_class_names(config: object, num_classes: int) -> list[str] | None:
    """Class names from ``config.id2label``; None when absent or the ``LABEL_i`` placeholders."""
    id2label = getattr(config, "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i))) for i in range(num_classes)]
    if any(n is None for n in names) or names == [f"LABEL_{i}" for i in range(num_classes)]:
        return None
    return [str(n) for n in names]


def split_heads(lin: nn.Module, x: Tensor, heads: int, head_dim: int) -> Tensor:
    """``lin(x)`` (N, T, heads * head_dim) as (N, heads, T, head_dim)."""
    b, t, _ = x.shape
    return lin(x).view(b, t, heads, head_dim).transpose(1, 2)


def is_hf_beit(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel) and type(model).__name__ == "BeitForImageClassification"


class HFBeitAdapter(ModelAdapter):
    r"""Decomposed view of a Hugging Face ``BeitForImageClassification`` (transformers 5.x layout).

    With ``use_mean_pooling`` (the released classifiers) the pooler averages the patch tokens
    and applies its layernorm, then the classifier: the lens of a token is
    ``classifier(pooler.layernorm(x))``; the class token is kept but not read by the head.
    Relative position biases (per layer and shared) are additive score biases over token
    pairs, read from the model's own modules.
    """

    family = "hf"

    def __init__(self, model: nn.Module) -> None:
        name = type(model).__name__
        if name != "BeitForImageClassification":
            raise UnsupportedModelError(f"{name} is not supported. Supported: {SUPPORTED}.")
        self.model = model
        self._backbone = model.beit
        cfg = model.config
        if not isinstance(model.classifier, nn.Linear):
            raise UnsupportedModelError(f"{name} without a linear classifier (num_labels=0) is not supported")
        if self._backbone.pooler is None:
            raise UnsupportedModelError(f"{name} without its pooler is not supported")
        try:
            self._layers = list(_first_attr(self._backbone, "layers", "encoder.layer"))
            for layer in self._layers:
                for part in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                             "mlp.fc1", "mlp.activation_fn", "mlp.fc2", "layernorm_before", "layernorm_after"):  # fmt: skip
                    _first_attr(layer, part)
        except AttributeError as e:
            raise UnsupportedModelError(
                f"{name}: the layers do not have the transformers 5.x BEiT structure ({e}); "
                "upgrade transformers to 5.x"
            ) from e
        self.pooling = "avg" if self._backbone.pooler.layernorm is not None else "token"
        self.prefix_tokens = ("cls",)
        self.num_blocks = len(self._layers)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = self._layers[0].attention.head_dim
        self.embed_dim = cfg.hidden_size
        self.num_classes = model.classifier.out_features
        self.class_names = hf_class_names(cfg, self.num_classes)

    @property
    def img_size(self) -> tuple[int, int]:
        return hf_size(self.model.config.image_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return hf_size(self.model.config.patch_size)

    @property
    def in_chans(self) -> int:
        return self.model.config.num_channels

    @property
    def head(self) -> nn.Linear:
        return self.model.classifier

    def pre_pool_norm(self, states: Tensor) -> Tensor:
        return self._backbone.layernorm(states)

    def post_pool_norm(self, pooled: Tensor) -> Tensor:
        norm = self._backbone.pooler.layernorm
        return pooled if norm is None else norm(pooled)

    def embed(self, pixel_values: Tensor) -> Tensor:
        return self._backbone.embeddings(pixel_values)

    def model_logits(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).logits

    def relative_position_bias(self, block: int) -> Tensor | None:
        r"""The attention-score bias of layer ``block`` over the full sequence, (1, heads, T, T).

        The shared bias (``beit.shared_position_bias``) plus the layer's own, as the model
        adds them; None when the model has neither.
        """
        window = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        t = self.num_tokens
        bias = None
        shared = self._backbone.shared_position_bias
        if shared is not None:
            bias = shared(window, interpolate_pos_encoding=False, dim_size=t)
        own = self._layers[block].relative_position_bias
        if own is not None:
            own_bias = own(window, False, dim_size=t)
            bias = own_bias if bias is None else own_bias + bias
        return bias

    def block(self, index: int) -> BlockParts:
        layer = self._layers[index]
        att = layer.attention
        heads, hd = self.num_heads, self.head_dim

        def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return (split_heads(att.q_proj, x, heads, hd), split_heads(att.k_proj, x, heads, hd),
                    split_heads(att.v_proj, x, heads, hd))  # fmt: skip

        has_bias = layer.relative_position_bias is not None or self._backbone.shared_position_bias is not None

        def attn_bias(token_index: Tensor | None) -> Tensor:
            return gather_pair_bias(self.relative_position_bias(index), token_index)

        return BlockParts(
            norm1=layer.layernorm_before,
            qkv=qkv,
            scale=att.scaling,
            attn_out_norm=identity,
            proj=att.o_proj,
            attn_post=scale_or_identity(layer.lambda_1),
            norm2=layer.layernorm_after,
            fc1=layer.mlp.fc1,
            act=layer.mlp.activation_fn,
            mlp_mid_norm=identity,
            fc2=layer.mlp.fc2,
            mlp_post=scale_or_identity(layer.lambda_2),
            scale_before_matmul=False,
            qkv_weight=torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight], 0),
            attn_bias=attn_bias if has_bias else None,
        )
