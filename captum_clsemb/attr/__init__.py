"""Captum-style attribution classes: identifiability, explanations and the baselines they are compared with."""

from captum_clsemb.attr.attention_rollout import AttentionRollout
from captum_clsemb.attr.blockwise_identifiability import (
    BlockwiseIdentifiability,
    identifiability_rate,
    identifiability_scores,
    images_with_identifiable_token,
    mean_identifiability,
)
from captum_clsemb.attr.chefer_gradient_rollout import CheferGradientRollout
from captum_clsemb.attr.chefer_relevancy import CheferRelevancy
from captum_clsemb.attr.class_embedding_gradient import ClassEmbeddingGradient
from captum_clsemb.attr.raw_attention import RawAttention

__all__ = [
    "BlockwiseIdentifiability",
    "ClassEmbeddingGradient",
    "RawAttention",
    "AttentionRollout",
    "CheferGradientRollout",
    "CheferRelevancy",
    "identifiability_scores",
    "identifiability_rate",
    "images_with_identifiable_token",
    "mean_identifiability",
]
