"""Adapters: one per model family, each exposing the same decomposed view of a ViT."""

from __future__ import annotations

from torch import nn

from captum_clsemb.adapters.base import BlockParts, ModelAdapter
from captum_clsemb.adapters.hf_vit import HFViTAdapter, is_hf_vit
from captum_clsemb.adapters.timm_vit import TimmViTAdapter, is_timm_vit
from captum_clsemb.errors import UnsupportedModelError

SUPPORTED_FAMILIES = (
    "timm VisionTransformer (class token or global average pooling with fc_norm, register tokens, no class "
    "token, layer scale, qkv_bias=False, ResPostBlock), timm VisionTransformerDistilled (DeiT distilled), "
    "Hugging Face ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher"
)


def adapt(model: nn.Module | ModelAdapter) -> ModelAdapter:
    r"""Return the adapter for a supported ViT (an adapter is returned unchanged).

    Args:
        model: a timm or Hugging Face ViT image classifier.
    Returns:
        the family's :class:`ModelAdapter`.
    Raises:
        UnsupportedModelError: naming the model class and the supported families.

    Examples::

        >>> import timm
        >>> from captum_clsemb.adapters import adapt
        >>> adapter = adapt(timm.create_model("vit_tiny_patch16_224", pretrained=False))
        >>> adapter.num_blocks, adapter.num_heads, adapter.grid_size
        (12, 3, (14, 14))
    """
    if isinstance(model, ModelAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"expected a torch.nn.Module ViT, got {type(model).__name__}. Supported: {SUPPORTED_FAMILIES}. "
            "Pass the model itself, not a lambda or forward function."
        )
    if is_timm_vit(model):
        return TimmViTAdapter(model)
    if is_hf_vit(model):
        return HFViTAdapter(model)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a supported model. Supported: {SUPPORTED_FAMILIES}."
    )


__all__ = [
    "adapt",
    "ModelAdapter",
    "BlockParts",
    "TimmViTAdapter",
    "HFViTAdapter",
    "UnsupportedModelError",
    "SUPPORTED_FAMILIES",
]
