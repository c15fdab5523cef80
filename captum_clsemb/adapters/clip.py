"""Adapter for :class:`captum_clsemb.zero_shot.ZeroShotClassifier`: CLIP / SigLIP vision towers whose
class embedding is the matrix of class text embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from captum_clsemb.adapters.base import (
    BlockParts,
    L2Normalize,
    LinearView,
    ModelAdapter,
    Scale,
    identity,
)
from captum_clsemb.adapters.hf_beit import hf_size, split_heads
from captum_clsemb.errors import InputValidationError, UnsupportedModelError
from captum_clsemb.zero_shot import ZeroShotClassifier

SUPPORTED = "captum_clsemb.ZeroShotClassifier over a Hugging Face CLIPModel or SiglipModel"


def is_zero_shot(model: nn.Module) -> bool:
    return isinstance(model, ZeroShotClassifier)


def is_contrastive(model: nn.Module) -> bool:
    """A bare CLIP / SigLIP model (not yet a classifier)."""
    return type(model).__name__ in (
        "CLIPModel",
        "SiglipModel",
        "CLIPVisionModelWithProjection",
        "SiglipVisionModel",
    )


class ZeroShotAdapter(ModelAdapter):
    r"""Decomposed view of a :class:`~captum_clsemb.zero_shot.ZeroShotClassifier`.

    The blocks are those of the vision tower. With ``T_n`` the unit-norm class text
    embeddings and ``s = exp(logit_scale)``, the lens of a vision token state ``x`` is the
    model's own image head followed by the zero-shot classifier:

    - CLIP: ``s * normalize(visual_projection(post_layernorm(x))) @ T_n^T``; the image
      embedding is the class token's, so the lens of the last block's class token is exactly
      the model's logits.
    - SigLIP (no class token; an attention-pooling head): the pooling head applied to the
      token alone (the head's output for a sequence in which every token has this state), then
      ``s * normalize(.) @ T_n^T + logit_bias``.

    The L2 normalisation of the image embedding is part of the model's head (cosine
    similarity) and is applied per token; it rescales a token's logits by a positive factor,
    so ranks (identifiability) are those of the unnormalised projection.

    The class embedding in the residual stream, used by value-vector analyses and by the
    raw lens (``apply_norm=False``: ``E x`` without norm, normalisation or pooling head), is
    ``E = s * T_n W_proj`` with ``W_proj`` the visual projection (CLIP) or the value and
    output projections of the pooling head's attention (SigLIP: the head's linear path; its
    MLP branch is not linear and is left out of ``E``).
    """

    family = "hf"

    def __init__(self, model: ZeroShotClassifier) -> None:
        self.model = model
        clip = model.model
        self._siglip = model.kind == "siglip"
        self._vision = clip.vision_model
        cfg = self._vision.config
        try:
            self._layers = list(self._vision.encoder.layers)
            for layer in self._layers:
                _ = (layer.layer_norm1, layer.self_attn.q_proj, layer.self_attn.out_proj, layer.layer_norm2,
                     layer.mlp.fc1, layer.mlp.fc2)  # fmt: skip
        except AttributeError as e:
            raise UnsupportedModelError(
                f"{type(clip).__name__}: the vision layers do not have the transformers 5.x structure ({e})"
            ) from e
        # CLIP's head is a chain of linear maps and constant factors (head_path); SigLIP's is not
        self.head_structure = (
            "the zero-shot head's attention-pooling head (attention over all tokens, then an MLP)"
            if self._siglip
            else None
        )
        self.prefix_tokens = () if self._siglip else ("cls",)
        self.pooling = "map" if self._siglip else "token"
        self.num_blocks = len(self._layers)
        self.num_heads = cfg.num_attention_heads
        self.embed_dim = cfg.hidden_size
        self.head_dim = self._layers[0].self_attn.head_dim
        self.num_classes = model.num_classes
        self.class_names = model.class_names
        self._head = LinearView(lambda: self.class_embedding, lambda: self.class_bias)

    # -- structure ------------------------------------------------------------------------------
    @property
    def img_size(self) -> tuple[int, int]:
        return hf_size(self._vision.config.image_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return hf_size(self._vision.config.patch_size)

    @property
    def in_chans(self) -> int:
        return self._vision.config.num_channels

    def embed(self, pixel_values: Tensor) -> Tensor:
        x = self._vision.embeddings(pixel_values)
        return x if self._siglip else self._vision.pre_layrnorm(x)

    def model_logits(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values)

    def block(self, index: int) -> BlockParts:
        layer = self._layers[index]
        att = layer.self_attn
        heads, hd = self.num_heads, self.head_dim

        def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return (split_heads(att.q_proj, x, heads, hd), split_heads(att.k_proj, x, heads, hd),
                    split_heads(att.v_proj, x, heads, hd))  # fmt: skip

        return BlockParts(
            norm1=layer.layer_norm1,
            qkv=qkv,
            scale=att.scale,
            attn_out_norm=identity,
            proj=att.out_proj,
            attn_post=identity,
            norm2=layer.layer_norm2,
            fc1=layer.mlp.fc1,
            act=layer.mlp.activation_fn,
            mlp_mid_norm=identity,
            fc2=layer.mlp.fc2,
            mlp_post=identity,
            scale_before_matmul=False,
            qkv_weight=torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight], 0),
        )

    # -- classification path ----------------------------------------------------------------------
    def _projection_weight(self) -> Tensor:
        """The linear map from a normed vision state to the joint space, (D, d)."""
        if not self._siglip:
            return self.model.model.visual_projection.weight
        mha = self._vision.head.attention
        d = self.embed_dim
        w_v = mha.in_proj_weight[2 * d :]
        return mha.out_proj.weight @ w_v

    @property
    def class_embedding(self) -> Tensor:
        """E = exp(logit_scale) * T_n W_proj, (num_classes, embed_dim), see the class docstring."""
        return (self.model.normalized_class_embeddings() @ self._projection_weight()) * self.model.logit_scale

    @property
    def class_bias(self) -> Tensor | None:
        bias = self.model.logit_bias
        return None if bias is None else bias.expand(self.num_classes)

    @property
    def head(self) -> nn.Module:
        """The raw linear readout ``x -> E x (+ logit_bias)`` (a :class:`LinearView`)."""
        return self._head

    @property
    def model_name(self) -> str:
        return f"ZeroShotClassifier over {type(self.model.model).__name__}"

    @property
    def head_path(self) -> tuple[nn.Module, ...] | None:
        r"""CLIP: the visual projection, L2 normalisation, the unit class text matrix ``T_n``
        (a :class:`LinearView`, no bias) and ``exp(logit_scale)``. None for SigLIP, whose
        attention-pooling head is not such a chain."""
        if self._siglip:
            return None
        clf = self.model
        return (
            clf.model.visual_projection,
            L2Normalize(),
            LinearView(clf.normalized_class_embeddings, lambda: None),
            Scale(lambda: clf.logit_scale),
        )

    def pre_pool_norm(self, states: Tensor) -> Tensor:
        return self._vision.post_layernorm(states)

    def post_pool_norm(self, pooled: Tensor) -> Tensor:
        return pooled

    def image_embedding(self, states: Tensor) -> Tensor:
        r"""The image head on each token alone: (..., embed_dim) normed states -> (..., D)."""
        if not self._siglip:
            return self.model.model.visual_projection(states)
        shape = states.shape
        pooled = self._vision.head(states.reshape(-1, 1, shape[-1]))
        return pooled.reshape(*shape[:-1], pooled.shape[-1])

    def classify(self, final_states: Tensor) -> Tensor:
        normed = self._vision.post_layernorm(final_states if self._siglip else final_states[:, 0])
        img = self._vision.head(normed) if self._siglip else self.model.model.visual_projection(normed)
        return self.model.logits_from_image_embeddings(img)

    def project(
        self, states: Tensor, *, apply_norm: bool = True, include_bias: bool = True, head: str = "cls"
    ) -> Tensor:
        r"""Zero-shot logits of any vision token state through the model's image head.

        Args:
            states: token states, (..., embed_dim).
            apply_norm: the model's path (``post_layernorm``, image head, L2 normalisation).
                False gives the raw ``E x`` with ``E`` = :attr:`class_embedding`.
            include_bias: add SigLIP's logit bias (CLIP has none).
            head: ``"cls"`` only.
        Returns:
            logits, (..., num_classes).
        """
        if head != "cls":
            raise InputValidationError(
                f"head={head!r} needs a distilled model with two heads; use head='cls'"
            )
        if not apply_norm:
            bias = self.class_bias if include_bias else None
            return torch.nn.functional.linear(states, self.class_embedding, bias)
        img = self.image_embedding(self._vision.post_layernorm(states))
        return self.model.logits_from_image_embeddings(img, include_bias=include_bias)
