"""Adapter for timm ``VisionTransformer`` and ``VisionTransformerDistilled``."""

from __future__ import annotations

from torch import Tensor, nn

from captum_clsemb.adapters._parts import TimmModelParts
from captum_clsemb.adapters.base import BlockParts, ModelAdapter, identity
from captum_clsemb.errors import UnsupportedModelError

SUPPORTED = (
    "timm VisionTransformer (class-token or global-average pooling, register tokens, no class token, "
    "layer scale, qkv_bias=False, pre-norm Block or post-norm ResPostBlock) and VisionTransformerDistilled"
)


def is_timm_vit(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # timm missing: cannot be a timm model
        return False
    return isinstance(model, VisionTransformer)


def _unsupported(model: nn.Module, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(model).__name__}: {what} is not supported. Supported timm models: {SUPPORTED}."
    )


class TimmViTAdapter(TimmModelParts, ModelAdapter):
    r"""Decomposed view of a timm ``VisionTransformer`` (and DeiT distilled).

    Covers class-token pooling, global average pooling with ``fc_norm``
    (``global_pool='avg'``, ``vit_base_patch16_rpn_224``), register tokens, models without a
    class token, layer scale, ``qkv_bias=False`` and DeiT's distillation token and head.
    """

    family = "timm"

    def __init__(self, model: nn.Module) -> None:
        from timm.layers import Mlp
        from timm.models import vision_transformer as vt

        self.model = model
        pool = getattr(model, "global_pool", "token")
        if getattr(model, "attn_pool", None) is not None or pool not in ("token", "avg"):
            raise _unsupported(
                model, f"global_pool={pool!r} (only 'token' and 'avg' pooling have a linear lens)"
            )
        if not isinstance(model.head, nn.Linear):
            raise _unsupported(model, "a model without a linear classifier head (num_classes=0)")
        self.pooling = pool
        self._include_prefix_in_pool = bool(getattr(model, "pool_include_prefix", False))
        if self._include_prefix_in_pool and pool == "avg":
            raise _unsupported(model, "average pooling over prefix tokens (pool_include_prefix=True)")

        prefix: list[str] = []
        if getattr(model, "cls_token", None) is not None:
            prefix.append("cls")
        if getattr(model, "dist_token", None) is not None:
            prefix.append("dist")
        prefix += ["reg"] * int(getattr(model, "num_reg_tokens", 0) or 0)
        if len(prefix) != model.num_prefix_tokens:
            raise _unsupported(
                model, f"an unknown prefix-token layout ({model.num_prefix_tokens} prefix tokens)"
            )
        self.prefix_tokens = tuple(prefix)

        self._blocks = list(model.blocks)
        for i, blk in enumerate(self._blocks):
            if type(blk) not in (vt.Block, vt.ResPostBlock):
                raise _unsupported(model, f"block {i} of type {type(blk).__name__}")
            if type(blk.attn) is not vt.Attention or getattr(blk.attn, "gate", None) is not None:
                raise _unsupported(model, f"attention module {type(blk.attn).__name__} in block {i}")
            if type(blk.mlp) is not Mlp:
                raise _unsupported(model, f"MLP module {type(blk.mlp).__name__} in block {i} (GLU MLPs)")
        if getattr(model, "dynamic_img_size", False):
            raise _unsupported(model, "dynamic_img_size=True")

        attn0 = self._blocks[0].attn
        self.num_blocks = len(self._blocks)
        self.num_heads = attn0.num_heads
        self.head_dim = attn0.head_dim
        self.embed_dim = model.embed_dim
        self.num_classes = model.head.out_features
        self.class_names = None

    @property
    def head_dist(self) -> nn.Linear | None:
        return getattr(self.model, "head_dist", None)

    def embed(self, pixel_values: Tensor) -> Tensor:
        m = self.model
        x = m.patch_embed(pixel_values)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def model_logits(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values)

    def block(self, index: int) -> BlockParts:
        from timm.models import vision_transformer as vt

        blk = self._blocks[index]
        attn = blk.attn
        heads, hd = attn.num_heads, attn.head_dim

        def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            b, t, _ = x.shape
            q, k, v = attn.qkv(x).reshape(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
            return attn.q_norm(q), attn.k_norm(k), v

        post_norm = type(blk) is vt.ResPostBlock
        return BlockParts(
            norm1=identity if post_norm else blk.norm1,
            qkv=qkv,
            scale=attn.scale,
            attn_out_norm=getattr(attn, "norm", identity),
            proj=attn.proj,
            attn_post=blk.norm1 if post_norm else blk.ls1,
            norm2=identity if post_norm else blk.norm2,
            fc1=blk.mlp.fc1,
            act=blk.mlp.act,
            mlp_mid_norm=blk.mlp.norm,
            fc2=blk.mlp.fc2,
            mlp_post=blk.norm2 if post_norm else blk.ls2,
            scale_before_matmul=True,
            qkv_weight=attn.qkv.weight,
            qkv_is_projection=isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity),
            qkv_bias=attn.qkv.bias,
        )
