"""Adapter for timm ``Eva``: EVA, EVA-02 and the RoPE ViTs (rotary positions, SwiGLU, layer scale)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_clsemb.adapters._parts import TimmModelParts, scale_or_identity, timm_mlp_parts
from captum_clsemb.adapters.base import BlockParts, ModelAdapter, identity
from captum_clsemb.errors import UnsupportedModelError

SUPPORTED = (
    "timm Eva (EVA, EVA-02, vit_*_rope_*: rotary position embedding of type 'cat', 'mixed', 'dinov3' "
    "or 'mrope', SwiGLU / GLU / plain MLPs, layer scale, class-token or average pooling, register tokens, "
    "pre-norm or post-norm blocks, qk-norm, grouped-query attention)"
)


def is_timm_eva(model: nn.Module) -> bool:
    try:
        from timm.models.eva import Eva
    except ImportError:  # timm missing: cannot be a timm model
        return False
    return isinstance(model, Eva)


def _unsupported(model: nn.Module, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{type(model).__name__}: {what} is not supported. Supported: {SUPPORTED}.")


class TimmEvaAdapter(TimmModelParts, ModelAdapter):
    r"""Decomposed view of a timm ``Eva`` (EVA-02, ``vit_*_rope_*``, EVA-CLIP image towers with a head).

    Rotary position embedding is applied to q and k of the patch tokens after the q/k
    projection (and qk-norm), as the model does; with dropped tokens each kept token keeps
    the rotation of its own grid position. SwiGLU MLPs expose ``act(gate) * signal`` as the
    MLP key coefficients and ``fc2`` columns as value vectors. Attention pooling
    (``global_pool='map'``), max pooling and gated attention are not supported: they have no
    linear lens or do not fit the block decomposition.
    """

    family = "timm"

    def __init__(self, model: nn.Module) -> None:
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

        self.model = model
        pool = model.global_pool
        if getattr(model, "attn_pool", None) is not None or pool not in ("token", "avg"):
            raise _unsupported(
                model,
                f"global_pool={pool!r} (only 'token' and 'avg' pooling have a linear lens; attention "
                "pooling 'map' and max pooling do not)",
            )
        if not isinstance(model.head, nn.Linear):
            raise _unsupported(model, "a model without a linear classifier head (num_classes=0)")
        if getattr(model, "dynamic_img_size", False):
            raise _unsupported(model, "dynamic_img_size=True")
        self.pooling = pool
        prefix = (["cls"] if model.cls_token is not None else []) + ["reg"] * (
            0 if model.reg_token is None else model.reg_token.shape[1]
        )
        if len(prefix) != model.num_prefix_tokens:
            raise _unsupported(
                model, f"an unknown prefix-token layout ({model.num_prefix_tokens} prefix tokens)"
            )
        self.prefix_tokens = tuple(prefix)
        self._mixed = bool(getattr(model, "rope_mixed", False)) and model.rope is not None

        self._blocks = list(model.blocks)
        self._mlps = []
        for i, blk in enumerate(self._blocks):
            if type(blk) not in (EvaBlock, EvaBlockPostNorm):
                raise _unsupported(model, f"block {i} of type {type(blk).__name__}")
            attn = blk.attn
            if type(attn) not in (EvaAttention, AttentionRope):
                raise _unsupported(model, f"attention module {type(attn).__name__} in block {i}")
            if getattr(attn, "gate", None) is not None:
                raise _unsupported(model, f"gated attention in block {i} (the gate reads the block input)")
            if model.rope is not None and attn.num_prefix_tokens != model.num_prefix_tokens:
                raise _unsupported(model, f"block {i} rotating a different number of prefix tokens")
            if getattr(attn, "num_kv_groups", 1) > 1 and self._mixed:
                raise _unsupported(model, "grouped-query attention with per-head mixed RoPE")
            parts = timm_mlp_parts(blk.mlp)
            if parts is None:
                raise _unsupported(model, f"MLP module {type(blk.mlp).__name__} in block {i}")
            self._mlps.append(parts)

        attn0 = self._blocks[0].attn
        self.num_blocks = len(self._blocks)
        self.num_heads = attn0.num_heads
        self.head_dim = attn0.head_dim
        self.embed_dim = model.embed_dim
        self.num_classes = model.head.out_features
        self.class_names = None

    def embed(self, pixel_values: Tensor) -> Tensor:
        m = self.model
        x = m.patch_embed(pixel_values)
        x, _ = m._pos_embed(x)  # patch dropout is off in eval mode
        return m.norm_pre(x)

    def model_logits(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values)

    # -- rotary position embedding ------------------------------------------------------------
    def rope_embedding(self, block: int) -> Tensor | None:
        r"""The concatenated sin/cos rotary embedding block ``block`` applies to the patch tokens.

        (num_patches, 2 * rot_dim), or (heads, num_patches, 2 * rot_dim) for per-head mixed
        RoPE; None without RoPE. Computed as the model does (``Eva._pos_embed``), in eval mode.
        """
        rope = self.model.rope
        if rope is None:
            return None
        if hasattr(rope, "feat_shape"):
            emb = rope.get_embed()
        else:  # RoPE modules without a cached grid (MRoPE) take the grid shape
            emb = rope.get_embed(shape=self.model.patch_embed.grid_size)
        return emb[block] if self._mixed else emb

    def _rope(self, block: int, attn: nn.Module):
        from timm.layers import apply_rot_embed_cat

        npt = attn.num_prefix_tokens
        half = bool(getattr(attn, "rotate_half", False))

        def rope(q: Tensor, k: Tensor, token_index: Tensor | None) -> tuple[Tensor, Tensor]:
            emb = self.rope_embedding(block)
            if token_index is not None:
                pos = token_index[:, npt:] - npt  # (N, K) grid positions of the kept patches
                emb = emb[pos].unsqueeze(1) if emb.dim() == 2 else emb[:, pos].transpose(0, 1)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], emb, half=half)], dim=2)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], emb, half=half)], dim=2)
            return q, k

        return rope

    def block(self, index: int) -> BlockParts:
        from timm.models.eva import EvaBlockPostNorm

        blk = self._blocks[index]
        attn = blk.attn
        heads, hd = attn.num_heads, attn.head_dim
        kv_heads = getattr(attn, "num_kv_heads", heads)
        groups = heads // kv_heads
        q_bias = getattr(attn, "q_bias", None)

        def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            b, t, _ = x.shape
            if attn.qkv is not None:
                if q_bias is not None:  # EvaAttention: q and v biases, a zero k bias
                    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                    if attn.qkv_bias_separate:
                        out = attn.qkv(x) + bias
                    else:
                        out = F.linear(x, weight=attn.qkv.weight, bias=bias)
                else:
                    out = attn.qkv(x)
                q, k, v = out.reshape(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
            else:
                q = attn.q_proj(x).reshape(b, t, heads, hd).transpose(1, 2)
                k = attn.k_proj(x).reshape(b, t, kv_heads, hd).transpose(1, 2)
                v = attn.v_proj(x).reshape(b, t, kv_heads, hd).transpose(1, 2)
            q, k = attn.q_norm(q), attn.k_norm(k)
            if groups > 1:  # grouped-query attention; RoPE is the same for every head, so it commutes
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            return q, k, v

        if attn.qkv is not None:
            qkv_weight = attn.qkv.weight
        elif groups == 1:
            qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], 0)
        else:
            qkv_weight = None
        post_norm = type(blk) is EvaBlockPostNorm
        mlp = self._mlps[index]
        return BlockParts(
            norm1=identity if post_norm else blk.norm1,
            qkv=qkv,
            scale=attn.scale,
            attn_out_norm=attn.norm,
            proj=attn.proj,
            attn_post=blk.norm1 if post_norm else scale_or_identity(blk.gamma_1),
            norm2=identity if post_norm else blk.norm2,
            fc1=mlp["fc1"],
            act=mlp["act"],
            mlp_mid_norm=mlp["mlp_mid_norm"],
            fc2=mlp["fc2"],
            mlp_post=blk.norm2 if post_norm else scale_or_identity(blk.gamma_2),
            scale_before_matmul=True,
            qkv_weight=qkv_weight,
            rope=None if self.model.rope is None else self._rope(index, attn),
            mlp_in=mlp["mlp_in"],
            mlp_gate=mlp["mlp_gate"],
        )
