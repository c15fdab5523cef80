"""Adapters: one per model family, each exposing the same decomposed view of a ViT."""

from __future__ import annotations

from torch import nn

from captum_clsemb.adapters.base import BlockParts, ModelAdapter
from captum_clsemb.adapters.clip import ZeroShotAdapter, is_contrastive, is_zero_shot
from captum_clsemb.adapters.hf_beit import HFBeitAdapter, is_hf_beit
from captum_clsemb.adapters.hf_dinov2 import HFDinov2Adapter, is_hf_dinov2
from captum_clsemb.adapters.hf_vit import HFViTAdapter, is_hf_vit
from captum_clsemb.adapters.timm_beit import TimmBeitAdapter, is_timm_beit
from captum_clsemb.adapters.timm_eva import TimmEvaAdapter, is_timm_eva
from captum_clsemb.adapters.timm_vit import TimmViTAdapter, is_timm_vit
from captum_clsemb.errors import UnsupportedModelError

SUPPORTED_FAMILIES = (
    "timm VisionTransformer (class token or global average pooling with fc_norm, register tokens, no class "
    "token, layer scale, qkv_bias=False, ResPostBlock), timm VisionTransformerDistilled (DeiT distilled), "
    "timm Eva (EVA-02, vit_*_rope_*: RoPE, SwiGLU), timm Beit (BEiT, BEiT v2), "
    "Hugging Face ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher, "
    "BeitForImageClassification, Dinov2ForImageClassification, Dinov2WithRegistersForImageClassification, "
    "and CLIP / SigLIP zero-shot classifiers (captum_clsemb.ZeroShotClassifier)"
)

# (predicate, adapter class), tried in order
_FAMILIES = (
    (is_timm_vit, TimmViTAdapter),
    (is_timm_eva, TimmEvaAdapter),
    (is_timm_beit, TimmBeitAdapter),
    (is_hf_vit, HFViTAdapter),
    (is_hf_beit, HFBeitAdapter),
    (is_hf_dinov2, HFDinov2Adapter),
    (is_zero_shot, ZeroShotAdapter),
)


def adapt(model: nn.Module | ModelAdapter) -> ModelAdapter:
    r"""Return the adapter for a supported ViT (an adapter is returned unchanged).

    Args:
        model: a timm or Hugging Face ViT image classifier, or a
            :class:`~captum_clsemb.zero_shot.ZeroShotClassifier`.
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
    for applies, adapter_cls in _FAMILIES:
        if applies(model):
            return adapter_cls(model)
    if is_contrastive(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} is an image-text model, not a classifier: wrap the full model with its class "
            "text embeddings, captum_clsemb.ZeroShotClassifier(model, class_embeddings) or "
            "ZeroShotClassifier.from_prompts(model, tokenizer, class_names). Supported: "
            f"{SUPPORTED_FAMILIES}."
        )
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a supported model. Supported: {SUPPORTED_FAMILIES}."
    )


__all__ = [
    "adapt",
    "ModelAdapter",
    "BlockParts",
    "TimmViTAdapter",
    "TimmEvaAdapter",
    "TimmBeitAdapter",
    "HFViTAdapter",
    "HFBeitAdapter",
    "HFDinov2Adapter",
    "ZeroShotAdapter",
    "UnsupportedModelError",
    "SUPPORTED_FAMILIES",
]
