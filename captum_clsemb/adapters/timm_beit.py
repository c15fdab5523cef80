"""Adapter for timm ``Beit`` (BEiT, BEiT v2): relative position bias, mean pooling with ``fc_norm``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_clsemb.adapters._parts import TimmModelParts, gather_pair_bias, scale_or_identity, timm_mlp_parts
from captum_clsemb.adapters.base import BlockParts, ModelAdapter, identity
from captum_clsemb.errors import UnsupportedModelError

SUPPORTED = (
    "timm Beit (BEiT, BEiT v2: per-block or shared relative position bias, absolute position embedding, "
    "layer scale, SwiGLU, class-token or mean pooling with fc_norm)"
)


def is_timm_beit(model: nn.Module) -> bool:
    try:
        from timm.models.beit import Beit
    except ImportError:  # timm missing: cannot be a timm model
        return False
    return isinstance(model, Beit)


def _unsupported(model: nn.Module, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{type(model).__name__}: {what} is not supported. Supported: {SUPPORTED}.")


class TimmBeitAdapter(TimmModelParts, ModelAdapter):
    r"""Decomposed view of a timm ``Beit``.

    The relative position bias of each block (and the shared one, when the model has it) is
    an additive attention-score bias over token pairs; with dropped tokens the bias between
    two kept tokens is the one of their own positions. Mean-pooled models (``global_pool='avg'``,
    the released BEiT classifiers) average the patch tokens, then ``fc_norm`` and the head:
    the lens of a token is ``head(fc_norm(x))``; the class token is kept in the sequence
    but not read by the head.
    """

    family = "timm"

    def __init__(self, model: nn.Module) -> None:
        from timm.models.beit import Attention, Block

        self.model = model
        pool = model.global_pool
        if pool not in ("token", "avg"):
            raise _unsupported(
                model, f"global_pool={pool!r} (only 'token' and 'avg' pooling have a linear lens)"
            )
        if not isinstance(model.head, nn.Linear):
            raise _unsupported(model, "a model without a linear classifier head (num_classes=0)")
        self.pooling = pool
        self.prefix_tokens = ("cls",)
        self._blocks = list(model.blocks)
        self._mlps = []
        for i, blk in enumerate(self._blocks):
            if type(blk) is not Block or type(blk.attn) is not Attention:
                raise _unsupported(model, f"block {i} of type {type(blk).__name__}")
            parts = timm_mlp_parts(blk.mlp)
            if parts is None:
                raise _unsupported(model, f"MLP module {type(blk.mlp).__name__} in block {i}")
            self._mlps.append(parts)
        attn0 = self._blocks[0].attn
        self.num_blocks = len(self._blocks)
        self.num_heads = attn0.num_heads
        self.head_dim = attn0.qkv.out_features // (3 * attn0.num_heads)
        self.embed_dim = model.embed_dim
        self.num_classes = model.head.out_features
        self.class_names = None

    def embed(self, pixel_values: Tensor) -> Tensor:
        m = self.model  # as Beit.forward_features
        x = m.patch_embed(pixel_values)
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if m.pos_embed is not None:
            x = x + m.pos_embed
        return m.pos_drop(x)

    def model_logits(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values)

    def relative_position_bias(self, block: int) -> Tensor | None:
        r"""The attention-score bias of block ``block`` over the full sequence, (1, heads, T, T).

        The block's own relative position bias plus the model's shared one; None when the
        model has neither.
        """
        attn = self._blocks[block].attn
        bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
        if self.model.rel_pos_bias is not None:
            shared = self.model.rel_pos_bias().unsqueeze(0)
            bias = shared if bias is None else bias + shared
        return bias

    def block(self, index: int) -> BlockParts:
        blk = self._blocks[index]
        attn = blk.attn
        heads = attn.num_heads

        def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            b, t, _ = x.shape
            if attn.q_bias is None:
                out = attn.qkv(x)
            else:
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                out = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
            q, k, v = out.reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v

        has_bias = attn.relative_position_bias_table is not None or self.model.rel_pos_bias is not None

        def attn_bias(token_index: Tensor | None) -> Tensor:
            return gather_pair_bias(self.relative_position_bias(index), token_index)

        mlp = self._mlps[index]
        return BlockParts(
            norm1=blk.norm1,
            qkv=qkv,
            scale=attn.scale,
            attn_out_norm=identity,
            proj=attn.proj,
            attn_post=scale_or_identity(blk.gamma_1),
            norm2=blk.norm2,
            fc1=mlp["fc1"],
            act=mlp["act"],
            mlp_mid_norm=mlp["mlp_mid_norm"],
            fc2=mlp["fc2"],
            mlp_post=scale_or_identity(blk.gamma_2),
            scale_before_matmul=True,
            qkv_weight=attn.qkv.weight,
            attn_bias=attn_bias if has_bias else None,
            mlp_in=mlp["mlp_in"],
            mlp_gate=mlp["mlp_gate"],
        )
