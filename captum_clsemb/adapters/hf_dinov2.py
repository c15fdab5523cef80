"""Adapter for Hugging Face DINOv2 classifiers, whose head reads [class token, mean of patch tokens]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_clsemb.adapters._parts import scale_or_identity
from captum_clsemb.adapters.base import BlockParts, LinearView, ModelAdapter, identity
from captum_clsemb.adapters.hf_beit import hf_class_names, hf_size, split_heads
from captum_clsemb.errors import InputValidationError, UnsupportedModelError

_BACKBONES = {
    "Dinov2ForImageClassification": "dinov2",
    "Dinov2WithRegistersForImageClassification": "dinov2_with_registers",
}
SUPPORTED = (
    "Hugging Face Dinov2ForImageClassification and Dinov2WithRegistersForImageClassification "
    "(plain or SwiGLU MLP, layer scale)"
)


def is_hf_dinov2(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel) and type(model).__name__ in _BACKBONES


class HFDinov2Adapter(ModelAdapter):
    r"""Decomposed view of a Hugging Face DINOv2 image classifier (with or without registers).

    The classifier reads the concatenation ``[LN(cls), mean_j LN(patch_j)]`` (register tokens
    excluded), so ``logits = W_c LN(cls) + W_p mean_j LN(patch_j) + b`` with the head weight
    split into its class-token half ``W_c`` and its patch-mean half ``W_p``.

    **The lens** of a token state ``x`` is the head applied as if every token of the sequence
    had that state, i.e. ``x`` in both halves of the head's input::

        lens(x) = classifier([LN(x), LN(x)]) = (W_c + W_p) LN(x) + b

    This is the definition the lens has for every family (for a class-token head it is
    ``head(LN(x))``, for a mean-pooling head ``head(fc_norm(x))``), it is the same function
    for class and patch tokens (so their identifiability compares), affine in ``LN(x)``, and it
    equals the model's logits whenever the class token and the patch mean agree. It cannot
    equal the model's logits for the class token alone: the prediction depends on two
    different token states (the class token and the patch mean), and no function of one of
    them reproduces it. So the last block's class-token identifiability of the predicted class
    is high but not 1 by construction, unlike single-readout heads. The class embedding is
    ``E = W_c + W_p``.
    """

    family = "hf"

    def __init__(self, model: nn.Module) -> None:
        name = type(model).__name__
        if name not in _BACKBONES:
            raise UnsupportedModelError(f"{name} is not supported. Supported: {SUPPORTED}.")
        self.model = model
        self._backbone = getattr(model, _BACKBONES[name])
        cfg = model.config
        d = cfg.hidden_size
        if not isinstance(model.classifier, nn.Linear) or model.classifier.in_features != 2 * d:
            raise UnsupportedModelError(
                f"{name}: only a linear classifier over [class token, patch mean] (in_features = "
                f"2 * hidden_size) is supported"
            )
        try:
            self._layers = list(self._backbone.encoder.layer)
            for layer in self._layers:
                _ = (layer.norm1, layer.norm2, layer.attention.q_proj, layer.attention.o_proj, layer.mlp,
                     layer.layer_scale1.lambda1, layer.layer_scale2.lambda1)  # fmt: skip
        except AttributeError as e:
            raise UnsupportedModelError(
                f"{name}: the layers do not have the transformers 5.x DINOv2 structure ({e}); "
                "upgrade transformers to 5.x"
            ) from e
        regs = int(getattr(cfg, "num_register_tokens", 0) or 0) if "Registers" in name else 0
        self.prefix_tokens = ("cls",) + ("reg",) * regs
        self.pooling = "cls+avg"
        self.num_blocks = len(self._layers)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = self._layers[0].attention.head_dim
        self.embed_dim = d
        self.num_classes = model.classifier.out_features
        self.class_names = hf_class_names(cfg, self.num_classes)
        clf = model.classifier
        self._head = LinearView(lambda: clf.weight[:, :d] + clf.weight[:, d:], lambda: clf.bias)

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
    def head(self) -> nn.Module:
        """The lens head ``x -> (W_c + W_p) x + b`` (a :class:`LinearView` of the classifier)."""
        return self._head

    @property
    def head_path(self) -> tuple[nn.Module, ...]:
        """The classifier itself, over ``[LN(cls), mean_j LN(patch_j)]`` (2 * hidden_size inputs)."""
        return (self.model.classifier,)

    def pre_pool_norm(self, states: Tensor) -> Tensor:
        return self._backbone.layernorm(states)

    def post_pool_norm(self, pooled: Tensor) -> Tensor:
        return pooled

    def embed(self, pixel_values: Tensor) -> Tensor:
        return self._backbone.embeddings(pixel_values)

    def model_logits(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).logits

    def classify(self, final_states: Tensor) -> Tensor:
        normed = self._backbone.layernorm(final_states)
        pooled = torch.cat([normed[:, 0], normed[:, self.num_prefix_tokens :].mean(dim=1)], dim=1)
        return self.model.classifier(pooled)

    def project(
        self, states: Tensor, *, apply_norm: bool = True, include_bias: bool = True, head: str = "cls"
    ) -> Tensor:
        r"""The lens ``classifier([LN(x), LN(x)])``: the token in both halves of the head's input.

        Args:
            states: token states, (..., embed_dim).
            apply_norm: apply the final layernorm. Default: True.
            include_bias: add the classifier bias. Default: True.
            head: ``"cls"`` only (one classifier).
        Returns:
            logits, (..., num_classes).
        """
        if head != "cls":
            raise InputValidationError(
                f"head={head!r} needs a distilled model with two heads; use head='cls'"
            )
        x = self._backbone.layernorm(states) if apply_norm else states
        clf = self.model.classifier
        return F.linear(torch.cat([x, x], dim=-1), clf.weight, clf.bias if include_bias else None)

    def block(self, index: int) -> BlockParts:
        layer = self._layers[index]
        att, mlp = layer.attention, layer.mlp
        heads, hd = self.num_heads, self.head_dim

        def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return (split_heads(att.q_proj, x, heads, hd), split_heads(att.k_proj, x, heads, hd),
                    split_heads(att.v_proj, x, heads, hd))  # fmt: skip

        if hasattr(mlp, "gate_proj"):  # SwiGLU: down(act(gate(x)) * up(x))

            def swiglu(x: Tensor) -> Tensor:
                return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)

            def gate(x: Tensor) -> Tensor:
                return mlp.act_fn(mlp.gate_proj(x))

            fc1, act, fc2, mlp_in, mlp_gate = mlp.up_proj, mlp.act_fn, mlp.down_proj, swiglu, gate
        else:
            fc1, act, fc2, mlp_in, mlp_gate = mlp.fc1, mlp.activation_fn, mlp.fc2, None, None
        return BlockParts(
            norm1=layer.norm1,
            qkv=qkv,
            scale=att.scaling,
            attn_out_norm=identity,
            proj=att.o_proj,
            attn_post=scale_or_identity(layer.layer_scale1.lambda1),
            norm2=layer.norm2,
            fc1=fc1,
            act=act,
            mlp_mid_norm=identity,
            fc2=fc2,
            mlp_post=scale_or_identity(layer.layer_scale2.lambda1),
            scale_before_matmul=False,
            qkv_weight=torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight], 0),
            mlp_in=mlp_in,
            mlp_gate=mlp_gate,
        )
