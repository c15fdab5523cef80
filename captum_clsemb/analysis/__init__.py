r"""Mechanistic analyses in class embedding space (paper Sec. 5 and 6).

- :class:`ValueVectorProjector`: value vectors of attention and MLP sub-layers projected on
  the class embedding: class-value agreement (vs a random init), top classes per memory,
  key-value agreement per token and per dataset, compositionality.
- :func:`class_similarity_change_rate`: how attention and MLP raise the target logit.
- :func:`residual_match_rate`: which component's top-1 class the residual stream keeps.
- :func:`identifiability_summary`: dataset-level identifiability curves (Fig. 2).
- Several models: :func:`per_image_identifiability`, :func:`compare_models` (Fig. 2 curves
  over normalised depth, Table 1, trained-vs-random-init tests), :func:`random_init_copy`.
- Perturbations: :func:`attention_edit_effect`, :func:`token_group_removal_effect`,
  :func:`class_context_identifiability`, :func:`patch_labels_from_mask`,
  :func:`make_composite_images`.
- Segmentation masks: :func:`read_mask` (ImageNet-S and single-channel PNGs),
  :func:`find_masks`, :func:`mask_token_labels`, and :func:`class_context_comparison`
  (Fig. 3a with its permutation test).

Dataset-level functions take an image tensor (with ``target``/``masks``) or an iterable of
``(images, labels[, masks])`` batches such as a DataLoader, and keep only per-block sums.
"""

from captum_clsemb.analysis.class_building import class_similarity_change, class_similarity_change_rate
from captum_clsemb.analysis.identifiability import identifiability_summary
from captum_clsemb.analysis.masks import (
    ClassContextComparison,
    class_context_comparison,
    find_masks,
    input_region,
    mask_coverage,
    mask_token_labels,
    read_mask,
    transform_geometry,
)
from captum_clsemb.analysis.model_comparison import (
    IdentifiabilityRecord,
    ModelComparison,
    compare_models,
    depth_weights,
    per_image_identifiability,
    resample_depth,
)
from captum_clsemb.analysis.perturbation import (
    attention_edit_effect,
    class_context_identifiability,
    make_composite_images,
    patch_coverage,
    patch_labels_from_mask,
    token_group_removal_effect,
)
from captum_clsemb.analysis.random_init import random_init_copy
from captum_clsemb.analysis.residual_match import CATEGORIES as RESIDUAL_MATCH_CATEGORIES
from captum_clsemb.analysis.residual_match import residual_match, residual_match_rate
from captum_clsemb.analysis.value_vectors import ClassScore, ValueVectorProjector

__all__ = [
    "ValueVectorProjector",
    "ClassScore",
    "class_similarity_change",
    "class_similarity_change_rate",
    "residual_match",
    "residual_match_rate",
    "RESIDUAL_MATCH_CATEGORIES",
    "identifiability_summary",
    "per_image_identifiability",
    "IdentifiabilityRecord",
    "compare_models",
    "ModelComparison",
    "resample_depth",
    "depth_weights",
    "random_init_copy",
    "read_mask",
    "find_masks",
    "input_region",
    "transform_geometry",
    "mask_coverage",
    "mask_token_labels",
    "class_context_comparison",
    "ClassContextComparison",
    "attention_edit_effect",
    "class_context_identifiability",
    "token_group_removal_effect",
    "patch_coverage",
    "patch_labels_from_mask",
    "make_composite_images",
]
