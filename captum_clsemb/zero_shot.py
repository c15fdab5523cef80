r"""CLIP / SigLIP as zero-shot image classifiers whose class embedding is a matrix of text embeddings.

A contrastive image-text model classifies an image zero-shot by comparing its image embedding
with the text embeddings of one prompt (or an ensemble of prompts) per class.
:class:`ZeroShotClassifier` turns a Hugging Face ``CLIPModel`` or ``SiglipModel`` and a (C, D)
matrix of class text embeddings into an ordinary image classifier, ``forward(pixel_values)``
-> (N, C) logits, that every attribution class, analysis and metric of the package accepts::

    CLIP:    logits = exp(logit_scale) * cos(image_embedding, text_c)
    SigLIP:  logits = exp(logit_scale) * cos(image_embedding, text_c) + logit_bias

exactly as the model scores image-text pairs (``logits_per_image``); SigLIP's are sigmoid
logits (apply ``torch.sigmoid`` for per-class probabilities).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from captum_clsemb.errors import InputValidationError, UnsupportedModelError

DEFAULT_TEMPLATES = ("a photo of a {}.",)
_MODELS = ("CLIPModel", "SiglipModel")


def _kind(model: nn.Module) -> str:
    name = type(model).__name__
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()  # noqa: N806
    if not isinstance(model, PreTrainedModel) or name not in _MODELS:
        raise UnsupportedModelError(
            f"ZeroShotClassifier wraps a Hugging Face CLIPModel or SiglipModel, got {name}. Load one with "
            "transformers.CLIPModel.from_pretrained(...) (or captum_clsemb.load_model('hf:openai/clip-vit-base-patch32'))"
        )
    if name == "SiglipModel" and not getattr(model.vision_model, "use_head", False):
        raise UnsupportedModelError(
            "SiglipModel without its attention-pooling head (vision_use_head=False) has no image embedding"
        )
    return "clip" if name == "CLIPModel" else "siglip"


def _pooled(out: object) -> Tensor:
    """Projected features from ``get_*_features`` (a tensor in transformers 4.x, an output in 5.x)."""
    return out if isinstance(out, Tensor) else out.pooler_output


class ZeroShotClassifier(nn.Module):
    r"""A CLIP / SigLIP model and a (C, D) matrix of class text embeddings as an image classifier.

    ``forward(pixel_values)`` returns the zero-shot logits (N, C): the cosine similarity of the
    image embedding with each class's text embedding, times ``exp(logit_scale)`` (plus
    ``logit_bias`` for SigLIP), as the model's own ``logits_per_image``. The text embeddings
    are normalised in the forward; the matrix is kept as given (a buffer, so it follows
    ``.to(device)``). The wrapped model is never modified.

    In class embedding space (``captum_clsemb.adapters``), the lens of a vision token is the
    model's image head followed by the class matrix: CLIP ``post_layernorm``, the visual
    projection, L2 normalisation, ``exp(logit_scale) * text_n``; SigLIP ``post_layernorm``,
    the attention-pooling head on the token alone, L2 normalisation,
    ``exp(logit_scale) * text_n + logit_bias``.

    Args:
        model: a Hugging Face ``CLIPModel`` or ``SiglipModel``.
        class_embeddings: (C, D) text embeddings, one row per class, in the model's joint
            embedding space (``model.get_text_features``), e.g. from :meth:`from_prompts`.
        class_names: names of the C classes (optional).

    Examples::

        >>> from transformers import CLIPModel, CLIPTokenizer
        >>> model = CLIPModel.from_pretrained("openai/clip-vit-base-patch32")
        >>> tokenizer = CLIPTokenizer.from_pretrained("openai/clip-vit-base-patch32")
        >>> clf = ZeroShotClassifier.from_prompts(model, tokenizer, ["cat", "dog"])
        >>> clf(pixel_values).shape          # (N, 2)
        >>> BlockwiseIdentifiability(clf).attribute(pixel_values)
    """

    def __init__(
        self, model: nn.Module, class_embeddings: Tensor, class_names: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.kind = _kind(model)
        if not isinstance(class_embeddings, Tensor) or class_embeddings.dim() != 2:
            raise InputValidationError(
                "class_embeddings must be a (num_classes, embed_dim) tensor of text embeddings, got "
                f"{type(class_embeddings).__name__}"
                + (
                    f" of shape {tuple(class_embeddings.shape)}"
                    if isinstance(class_embeddings, Tensor)
                    else ""
                )
            )
        dim = self.joint_dim(model)
        if class_embeddings.shape[1] != dim or class_embeddings.shape[0] < 1:
            raise InputValidationError(
                f"class_embeddings must be (num_classes, {dim}) for this model's joint embedding space, got "
                f"{tuple(class_embeddings.shape)}; compute them with model.get_text_features or from_prompts"
            )
        if not class_embeddings.is_floating_point() or not torch.isfinite(class_embeddings).all():
            raise InputValidationError("class_embeddings must be finite floating-point values")
        if (class_embeddings.norm(dim=-1) == 0).any():
            raise InputValidationError(
                "a class embedding is the zero vector; it has no direction to compare with"
            )
        if class_names is not None:
            class_names = [str(n) for n in class_names]
            if len(class_names) != class_embeddings.shape[0]:
                raise InputValidationError(
                    f"got {len(class_names)} class names for {class_embeddings.shape[0]} class embeddings"
                )
        self.model = model
        param = next(model.parameters())
        self.register_buffer(
            "class_embeddings", class_embeddings.detach().to(device=param.device, dtype=param.dtype).clone()
        )
        self.class_names = class_names

    @staticmethod
    def joint_dim(model: nn.Module) -> int:
        """Dimension of the joint image-text embedding space."""
        if type(model).__name__ == "CLIPModel":
            return model.visual_projection.out_features
        return model.config.vision_config.hidden_size

    @property
    def num_classes(self) -> int:
        return self.class_embeddings.shape[0]

    @property
    def logit_scale(self) -> Tensor:
        """``exp(model.logit_scale)``, the factor on the cosine similarities."""
        return self.model.logit_scale.exp()

    @property
    def logit_bias(self) -> Tensor | None:
        """SigLIP's scalar logit bias; None for CLIP."""
        return self.model.logit_bias if self.kind == "siglip" else None

    def normalized_class_embeddings(self) -> Tensor:
        """The class matrix with unit rows, (C, D)."""
        e = self.class_embeddings
        return e / e.norm(p=2, dim=-1, keepdim=True)

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """The model's image embedding (before normalisation), (N, D)."""
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    def logits_from_image_embeddings(self, image_embeds: Tensor, include_bias: bool = True) -> Tensor:
        r"""Zero-shot logits of image embeddings (..., D) -> (..., C), as ``forward`` computes them."""
        img = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        logits = (img @ self.normalized_class_embeddings().t()) * self.logit_scale
        if include_bias and self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits

    def forward(self, pixel_values: Tensor) -> Tensor:
        r"""Zero-shot logits (N, C) of images (N, 3, H, W) preprocessed for the model."""
        return self.logits_from_image_embeddings(self.image_embeddings(pixel_values))

    @classmethod
    @torch.no_grad()
    def from_prompts(
        cls,
        model: nn.Module,
        tokenizer: object,
        class_names: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        batch_size: int = 256,
    ) -> ZeroShotClassifier:
        r"""Build the class matrix from prompts, with the usual template ensembling.

        Each class name is put into every template (``"a photo of a {}."``), each prompt is
        embedded with ``model.get_text_features`` and normalised to unit length; the class
        embedding is the mean over the templates, normalised again (Radford et al., 2021).

        Args:
            model: a Hugging Face ``CLIPModel`` or ``SiglipModel``.
            tokenizer: its tokenizer (called as ``tokenizer(prompts, padding=..., truncation=True,
                return_tensors="pt")``; SigLIP prompts are padded to ``max_length`` as in training).
            class_names: one name per class.
            templates: prompt templates, each with one ``{}`` for the class name.
            batch_size: prompts per text forward.
        Returns:
            a :class:`ZeroShotClassifier` with ``class_names``.
        """
        kind = _kind(model)
        names = [str(n) for n in class_names] if class_names is not None else []
        if not names:
            raise InputValidationError("class_names is empty; pass one name per class")
        if isinstance(templates, str):
            templates = [templates]
        templates = list(templates)
        bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
        if not templates or bad:
            raise InputValidationError(
                f"templates must be strings with exactly one '{{}}' for the class name, got {bad or templates!r}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputValidationError(f"batch_size must be a positive int, got {batch_size!r}")
        prompts = [t.format(n) for n in names for t in templates]  # class-major
        padding = "max_length" if kind == "siglip" else True
        device = next(model.parameters()).device
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            feats = []
            for i in range(0, len(prompts), batch_size):
                tok = tokenizer(
                    prompts[i : i + batch_size], padding=padding, truncation=True, return_tensors="pt"
                )
                tok = {k: v.to(device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
                if kind == "siglip":
                    tok.pop("attention_mask", None)  # SigLIP's text tower attends to the padding as trained
                feats.append(_pooled(model.get_text_features(**tok)))
        finally:
            for m, was_training in flags:
                m.training = was_training
        emb = torch.cat(feats).view(len(names), len(templates), -1)
        emb = emb / emb.norm(p=2, dim=-1, keepdim=True)
        emb = emb.mean(dim=1)
        emb = emb / emb.norm(p=2, dim=-1, keepdim=True)
        return cls(model, emb, class_names=names)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_classes={self.num_classes}"
