r"""captum-clsemb: Vision Transformers analysed in class embedding space, Captum-style.

Implements Vilas, Schaumlöffel & Roig, "Analyzing Vision Transformers for Image
Classification in Class Embedding Space" (NeurIPS 2023) for timm and Hugging Face ViTs.
Public names are imported lazily so that ``import captum_clsemb`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from captum_clsemb._version import __version__
from captum_clsemb.errors import InputValidationError, UnsupportedModelError

# public name -> module that defines it
_LAZY = {
    "adapt": "captum_clsemb.adapters",
    "ModelAdapter": "captum_clsemb.adapters",
    # the traced forward lives in the subpackage of the same name: from captum_clsemb.trace import trace
    "BlockwiseIdentifiability": "captum_clsemb.attr",
    "identifiability_rate": "captum_clsemb.attr",
    "images_with_identifiable_token": "captum_clsemb.attr",
    "mean_identifiability": "captum_clsemb.attr",
    "ClassEmbeddingGradient": "captum_clsemb.attr",
    "RawAttention": "captum_clsemb.attr",
    "AttentionRollout": "captum_clsemb.attr",
    "CheferGradientRollout": "captum_clsemb.attr",
    "CheferRelevancy": "captum_clsemb.attr",
    "ValueVectorProjector": "captum_clsemb.analysis",
    "token_removal_auc": "captum_clsemb.metrics",
    "pixel_removal_auc": "captum_clsemb.metrics",
    "LinearProbeRanking": "captum_clsemb.metrics",
    "RandomRanking": "captum_clsemb.metrics",
    "compare_explanations": "captum_clsemb.metrics",
    "dataset_identifiability": "captum_clsemb.stream",
    "load_demo_model": "captum_clsemb.demo",
    "load_demo_images": "captum_clsemb.demo",
    "timm_to_hf": "captum_clsemb.convert",
    "ZeroShotClassifier": "captum_clsemb.zero_shot",
    "load_model": "captum_clsemb.hub",
    "ModelLoadError": "captum_clsemb.hub",
}

__all__ = ["__version__", "UnsupportedModelError", "InputValidationError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        try:
            value = getattr(module, name)
        except AttributeError as e:  # listed but not (yet) provided by its module
            raise AttributeError(f"captum_clsemb.{name} is not available in this version") from e
        globals()[name] = value
        return value
    raise AttributeError(f"module 'captum_clsemb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from captum_clsemb.adapters import ModelAdapter, adapt  # noqa: F401
    from captum_clsemb.attr import BlockwiseIdentifiability  # noqa: F401
