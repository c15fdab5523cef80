r"""Key-value memories of attention and MLP sub-layers in class embedding space (paper Sec. 3, 6).

An MLP sub-layer adds ``sum_j key_j(x) * v_j`` to the residual stream, where ``key_j`` is
the activation of hidden unit j and the value vector ``v_j`` is column j of ``fc2.weight``.
An attention sub-layer adds ``sum_m z_m * v_m`` where ``z`` is the concatenation over heads
of the attention-weighted values (the input of the output projection) and ``v_m`` is column m
of the output projection ``proj.weight``. Projecting value vectors onto the class embedding
``E`` (rows = class prototypes) shows which classes each memory promotes.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_clsemb._utils import TargetType
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.analysis._common import (
    DataType,
    RateAccumulator,
    check_k,
    check_layer,
    iter_batches,
    token_groups,
)
from captum_clsemb.errors import InputValidationError
from captum_clsemb.trace import trace
from captum_clsemb.zero_shot import ZeroShotClassifier

KEY_KINDS = {"mlp": "mlp_keys", "attn": "attn_keys"}
OUT_KINDS = {"mlp": "mlp_out", "attn": "attn_out"}
VARIANTS = ("paper", "authors")


class ClassScore(NamedTuple):
    """One class promoted by a value vector: index, name (None when unknown) and projection score."""

    index: int
    name: str | None
    score: float


def _layer_scale(post: object) -> Tensor | None:
    """The per-dimension gain of a sub-layer's post map when it is timm's LayerScale, else None."""
    gamma = getattr(post, "gamma", None)
    if isinstance(post, nn.Module) and type(post).__name__ == "LayerScale" and isinstance(gamma, Tensor):
        return gamma
    return None


class ValueVectorProjector(Attribution):
    r"""Value vectors of attention and MLP sub-layers projected onto the class embedding.

    Value vectors (one per memory) are the columns of the MLP's second linear layer
    (``fc2.weight``, ``M = hidden units``) or of the attention output projection
    (``proj.weight``, ``M = embed_dim``), read from ``adapter.block(b)``. When the sub-layer
    output passes through timm's layer scale, its gain is folded in (``gamma * column``), so
    a value vector is exactly what the memory adds to the residual per unit of key
    coefficient; post-norm blocks (``ResPostBlock``) apply a LayerNorm after the projection,
    so there the raw columns are used. The bias of the projection is not a memory and is
    left out. Weights are only read, never modified (the authors' code normalised them in
    place).

    ``E`` is ``adapter.class_embedding`` (the class-token head for DeiT-distilled models).

    Args:
        forward_func: a supported timm or Hugging Face ViT (or its adapter).
        class_names: names per class index; default ``adapter.class_names`` (Hugging Face
            ``id2label``), None when unknown.

    Examples::

        >>> vvp = ValueVectorProjector(model)
        >>> vvp.class_value_agreement("mlp").shape             # (num_blocks, num_classes)
        >>> vvp.random_baseline(seed=0).class_value_agreement("mlp")
        >>> vvp.top_classes(block=10, layer="mlp", memory=4, k=5)
        >>> agree = vvp.attribute(images, target=labels, layer="mlp", k=5)  # (N, blocks, T) bool
    """

    def __init__(
        self, forward_func: nn.Module | ModelAdapter, class_names: Sequence[str] | None = None
    ) -> None:
        self.adapter = adapt(forward_func)
        Attribution.__init__(self, self.adapter.model)
        names = class_names if class_names is not None else self.adapter.class_names
        if names is not None:
            names = [str(n) for n in names]
            if len(names) != self.adapter.num_classes:
                raise InputValidationError(
                    f"got {len(names)} class names for a model with {self.adapter.num_classes} classes"
                )
        self.class_names = names

    # -- weights ------------------------------------------------------------------------
    def _check_block(self, block: int) -> int:
        nb = self.adapter.num_blocks
        if not isinstance(block, int) or isinstance(block, bool) or not -nb <= block < nb:
            raise InputValidationError(f"block must be an int in [-{nb}, {nb - 1}], got {block!r}")
        return block % nb

    def value_vectors(self, block: int, layer: str = "mlp") -> Tensor:
        r"""The value vectors of one sub-layer, one row per memory.

        Args:
            block: block index (negative counts from the end).
            layer: ``"mlp"`` (columns of ``fc2.weight``) or ``"attn"`` (columns of the output
                projection ``proj.weight``).
        Returns:
            *Tensor* (num_memories, embed_dim), a new tensor (detached from the weights).
        """
        parts = self.adapter.block(self._check_block(block))
        linear, post = (
            (parts.fc2, parts.mlp_post) if check_layer(layer) == "mlp" else (parts.proj, parts.attn_post)
        )
        values = linear.weight.detach().t().clone()
        gamma = _layer_scale(post)
        if gamma is not None:
            values = values * gamma.detach()
        return values

    def value_projection(self, block: int, layer: str = "mlp") -> Tensor:
        r"""Raw projection of the value vectors onto the class embedding, ``E · W_out``.

        No normalisation, norm or bias: the paper's ``E · W_out`` used to read which classes
        a memory promotes (:meth:`top_classes`, :meth:`attribute`).

        Returns:
            *Tensor* (num_classes, num_memories).
        """
        return self.adapter.class_embedding.detach() @ self.value_vectors(block, layer).t()

    def similarity(self, block: int, layer: str = "mlp") -> Tensor:
        r"""Cosine similarity between class prototypes and value vectors.

        Rows of ``E`` and value vectors are normalised to unit length (paper Sec. 6,
        ``P = Ê · Ŵ_out^T``); a zero vector has similarity 0 with everything.

        Args:
            block: block index.
            layer: ``"mlp"`` or ``"attn"``.
        Returns:
            *Tensor* (num_classes, num_memories) with entries in [-1, 1].
        """
        e = F.normalize(self.adapter.class_embedding.detach(), dim=-1)
        v = F.normalize(self.value_vectors(block, layer), dim=-1)
        return e @ v.t()

    @log_usage(part_of_slo=True)
    def class_value_agreement(self, layer: str = "mlp") -> Tensor:
        r"""Class-value agreement: per class, the highest cosine similarity with any value vector.

        Args:
            layer: ``"mlp"`` or ``"attn"``.
        Returns:
            *Tensor* (num_blocks, num_classes): ``max_j cos(E_c, v_j)`` per block and class.
            Compare with :meth:`random_baseline` for the paper's Fig. 4a.
        """
        check_layer(layer)
        return torch.stack(
            [self.similarity(b, layer).max(dim=1).values for b in range(self.adapter.num_blocks)]
        )

    def random_baseline(self, seed: int = 0, init_mode: str | None = None) -> ValueVectorProjector:
        r"""A projector over a randomly initialised copy of the model (the paper's baseline).

        The model is deep-copied (the original is untouched) and every parameter is
        re-initialised with the family's own initialisation:

        - timm: ``model.init_weights(mode)``, by default the standard timm ViT init
          (``mode=''``: truncated normal std 0.02 for linear layers, zero biases), which is
          what ``timm.create_model(name, pretrained=False)`` gives, i.e. the authors'
          baseline, also for a model built with ``weight_init='skip'``.
          timm ``Eva`` and ``Beit`` have a single initialisation (``init_weights()``).
        - Hugging Face: the ``_is_hf_initialized`` flags of the copy are cleared and
          ``model.init_weights()`` re-runs the model's ``_init_weights`` on every module
          (normal with ``config.initializer_range``). For a
          :class:`~captum_clsemb.zero_shot.ZeroShotClassifier` the CLIP / SigLIP model is
          re-initialised and the class text embeddings are kept.

        The global RNG state is left unchanged (the init runs under ``torch.random.fork_rng``).

        Args:
            seed: seed for the initialisation.
            init_mode: timm only, one of ``''``, ``'jax'``, ``'jax_nlhb'``, ``'moco'``, ``'reset'``.
        Returns:
            a :class:`ValueVectorProjector` over the random copy (same class names).
        """
        model = copy.deepcopy(self.adapter.model)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            if self.adapter.family == "timm":
                has_modes = "mode" in inspect.signature(model.init_weights).parameters
                if init_mode is None or init_mode == "":
                    if has_modes:
                        # init_weights('') falls back to weight_init_mode ('reset' after weight_init='skip').
                        model.weight_init_mode = ""
                    model.init_weights()
                elif not has_modes:
                    raise InputValidationError(
                        f"init_mode applies to timm VisionTransformer models; {type(model).__name__} has a "
                        "single initialisation: leave init_mode None"
                    )
                else:
                    model.init_weights(mode=init_mode)
            elif self.adapter.family == "hf":
                if init_mode is not None:
                    raise InputValidationError("init_mode applies to timm models only; leave it None")
                # a zero-shot classifier re-initialises its image-text model; its class text matrix is kept
                hf_model = model.model if isinstance(model, ZeroShotClassifier) else model
                for module in hf_model.modules():
                    if hasattr(module, "_is_hf_initialized"):
                        module._is_hf_initialized = False
                    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                        if hasattr(t, "_is_hf_initialized"):
                            t._is_hf_initialized = False
                hf_model.init_weights()
            else:  # pragma: no cover - adapt() only returns the two families
                raise InputValidationError(
                    f"no random initialisation known for family {self.adapter.family!r}"
                )
        return ValueVectorProjector(model.eval(), class_names=self.class_names)

    def top_classes(self, block: int, layer: str = "mlp", memory: int = 0, k: int = 5) -> list[ClassScore]:
        r"""The k classes a value vector promotes most: top-k of ``E · v`` (raw weights).

        Args:
            block: block index.
            layer: ``"mlp"`` or ``"attn"``.
            memory: memory index (hidden unit for the MLP, projection input dim for attention).
            k: number of classes.
        Returns:
            list of :class:`ClassScore` ``(index, name, score)``, highest score first.
        """
        proj = self.value_projection(block, layer)
        m = proj.shape[1]
        if not isinstance(memory, int) or isinstance(memory, bool) or not -m <= memory < m:
            raise InputValidationError(f"memory must be an int in [-{m}, {m - 1}], got {memory!r}")
        check_k(k, self.adapter.num_classes, "k")
        scores, idx = proj[:, memory].topk(k)
        names = self.class_names
        return [
            ClassScore(int(i), None if names is None else names[int(i)], float(s))
            for s, i in zip(scores.tolist(), idx.tolist())
        ]

    # -- key-value agreement ----------------------------------------------------------------
    def promoted_classes(self, block: int, layer: str = "mlp", k: int = 5, variant: str = "paper") -> Tensor:
        r"""Boolean (num_classes, num_memories): does memory j promote class c?

        ``variant="paper"``: c is among the k highest entries of column j of ``E · W_out``
        (the value vector's top-k classes, paper Sec. 6). ``variant="authors"``: j is among
        the k highest entries of row c (the class's top-k memories; the authors' code).
        """
        proj = self.value_projection(block, layer)
        c, m = proj.shape
        out = torch.zeros(c, m, dtype=torch.bool, device=proj.device)
        if variant == "paper":
            out.scatter_(0, proj.topk(check_k(k, c, "k_classes"), dim=0).indices, True)
        elif variant == "authors":
            out.scatter_(1, proj.topk(check_k(k, m, "k_classes"), dim=1).indices, True)
        else:
            raise InputValidationError(f"variant must be one of {VARIANTS}, got {variant!r}")
        return out

    def _check_options(
        self, layer: str, k: int, k_classes: int | None = None, variant: str = "paper"
    ) -> None:
        """Validate the key-value options up front (before any forward pass)."""
        check_layer(layer)
        memories = self.value_vectors(0, layer).shape[0]
        check_k(k, memories, "k")
        if variant not in VARIANTS:
            raise InputValidationError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if k_classes is not None:
            check_k(k_classes, self.adapter.num_classes if variant == "paper" else memories, "k_classes")

    def _key_indices(
        self, x: Tensor, layer: str, k: int, with_output_top1: bool = False, lens_kwargs: dict | None = None
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        key_kind, out_kind = KEY_KINDS[layer], OUT_KINDS[layer]
        kinds = [key_kind, out_kind] if with_output_top1 else [key_kind]
        idx: list[Tensor] = []
        top1: list[Tensor] = []
        adapter = self.adapter

        def on_block(b: int, acts: dict[str, Tensor]) -> None:
            keys = acts[key_kind]
            idx.append(keys.topk(check_k(k, keys.shape[-1], "k"), dim=-1).indices)
            if with_output_top1:
                top1.append(adapter.project(acts[out_kind], **(lens_kwargs or {})).argmax(-1))

        tr = trace(adapter, x, record=kinds, on_block=on_block, store=False)
        return tr.logits, idx, top1

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        layer: str = "mlp",
        k: int = 5,
        k_classes: int | None = None,
        variant: str = "paper",
        internal_batch_size: int | None = None,
    ) -> Tensor:
        r"""Key-value agreement of every token at every block (paper Sec. 6).

        A token agrees at a block when any of its k most activated keys (highest
        coefficients) has a value vector that promotes the target class, i.e. with the
        paper's definition the target is among the ``k_classes`` highest entries of that
        value vector's projection ``E · v`` (raw weights). Key coefficients: MLP, the
        activation output of the first MLP layer (``mlp_keys``); attention, the
        attention-weighted values concatenated over heads (``attn_keys``), the input of the
        output projection. (For the rare timm blocks with a norm between the activation and
        ``fc2`` / before ``proj``, keys are ranked before that norm.)

        ``variant="authors"`` reproduces the authors' code instead, which takes the top-k
        along the memory axis: a key agrees when it is among the k memories with the highest
        projection onto the target class (row of ``E · W_out``). The two differ: a memory can
        be one of a class's strongest memories without the class being among the memory's
        top classes, and vice versa.

        Args:
            inputs: images (N, C, H, W) preprocessed for the model.
            target: class per example (int, list, 1-D tensor); None uses the model's
                predicted class from the same pass.
            layer: ``"mlp"`` or ``"attn"``.
            k: number of most activated keys per token. Default: 5.
            k_classes: number of top classes per value vector (paper variant) or top
                memories per class (authors variant). Default: ``k``.
            variant: ``"paper"`` (default) or ``"authors"``.
            internal_batch_size: split the batch into chunks of this size.
        Returns:
            *Tensor* bool (N, num_blocks, num_tokens), tokens in model order.
        """
        self._check_options(layer, k, k_classes, variant)
        promoted = self._all_promoted(layer, k, k_classes, variant)
        chunks = [
            self._agreement_batch(x, t, layer, k, promoted)[0]
            for x, t, _ in iter_batches(self.adapter, inputs, target, None, internal_batch_size)
        ]
        if not chunks:
            raise InputValidationError("inputs hold no images")
        return torch.cat(chunks, 0)

    def _all_promoted(self, layer: str, k: int, k_classes: int | None, variant: str) -> list[Tensor]:
        kc = k if k_classes is None else k_classes
        return [self.promoted_classes(b, layer, kc, variant) for b in range(self.adapter.num_blocks)]

    def _agreement_batch(
        self, x: Tensor, target: Tensor | None, layer: str, k: int, promoted: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """(N, blocks, T) agreement and the predictions, from one traced pass."""
        nb = self.adapter.num_blocks
        logits, idx, _ = self._key_indices(x, layer, k)
        pred = logits.argmax(-1)
        tgt = pred if target is None else target
        n, t, kk = idx[0].shape
        agree = []
        for b in range(nb):
            rows = promoted[b].to(tgt.device)[tgt]  # (N, M): memories promoting each example's target
            agree.append(rows.gather(1, idx[b].reshape(n, t * kk)).view(n, t, kk).any(-1))
        return torch.stack(agree, 1), pred

    @log_usage(part_of_slo=True)
    def key_value_agreement_rate(
        self,
        inputs: DataType,
        target: TargetType = None,
        layer: str = "mlp",
        k: int = 5,
        k_classes: int | None = None,
        variant: str = "paper",
        internal_batch_size: int | None = None,
    ) -> dict[str, Tensor]:
        r"""Key-value agreement rates per block, streamed over a dataset (paper Fig. 4b).

        Rates pool tokens: each token of the group counts once (for image tokens this equals
        the mean over images of the per-image share, as every image has the same number of
        tokens). Images are split by whether the model's prediction equals the label
        (with ``target=None`` the label is the prediction, so every image is "correct").

        Args:
            inputs: an image tensor (N, C, H, W) with ``target``, or an iterable of
                ``(images, labels)`` batches such as a DataLoader.
            target: labels when ``inputs`` is a tensor.
            layer, k, k_classes, variant: see :meth:`attribute`.
            internal_batch_size: chunk size for tensor inputs.
        Returns:
            dict of float64 (num_blocks,) tensors in percent (NaN for an empty group):
            ``"image"``, ``"image_correct"``, ``"image_incorrect"``, ``"all"`` (every token,
            prefix tokens included, the authors' pooling) and, for class-token models,
            ``"cls"``, ``"cls_correct"``, ``"cls_incorrect"``; plus 0-d ``"num_images"`` and
            ``"num_correct"``.
        """
        self._check_options(layer, k, k_classes, variant)
        promoted = self._all_promoted(layer, k, k_classes, variant)
        acc = RateAccumulator(self.adapter.num_blocks)
        groups = token_groups(self.adapter)
        num_images = num_correct = 0
        for x, t, _ in iter_batches(self.adapter, inputs, target, None, internal_batch_size):
            agree, pred = self._agreement_batch(x, t, layer, k, promoted)
            correct = torch.ones_like(pred, dtype=torch.bool) if t is None else pred == t
            num_images += x.shape[0]
            num_correct += int(correct.sum())
            acc.add_mask("all", agree)
            for name, pos in groups.items():
                a = agree[:, :, pos]
                a = a[..., None] if a.dim() == 2 else a
                acc.add_mask(name, a)
                acc.add_mask(f"{name}_correct", a[correct])
                acc.add_mask(f"{name}_incorrect", a[~correct])
        if num_images == 0:
            raise InputValidationError("inputs hold no images")
        out = {
            name: acc.percent(name)
            for name in ["all", *[f"{g}{s}" for g in groups for s in ("", "_correct", "_incorrect")]]
        }
        out["num_images"] = torch.tensor(num_images)
        out["num_correct"] = torch.tensor(num_correct)
        return out

    # -- compositionality -----------------------------------------------------------------
    @log_usage(part_of_slo=True)
    def compositionality(
        self,
        inputs: DataType,
        layer: str = "mlp",
        k: int = 5,
        apply_norm: bool = True,
        include_bias: bool = True,
        internal_batch_size: int | None = None,
    ) -> dict[str, Tensor]:
        r"""Share of tokens whose sub-layer prediction matches one of its top-k memories.

        For each token and block, the sub-layer output (``mlp_out`` / ``attn_out``, as added
        to the residual) is projected through the class embedding lens
        (``adapter.project``: final norm and head bias by default, as the authors) and its
        top-1 class compared with the top-1 class ``argmax_c (E · v_j)_c`` of each of its k
        most activated memories j. A high share means the layer's prediction is carried by
        single memories; a low share means it is compositional (paper Sec. 6 reports the
        match share, "compositional" = 100 − share). Labels in the batches are ignored.

        Args:
            inputs: an image tensor or an iterable of batches (labels ignored).
            layer: ``"mlp"`` or ``"attn"``.
            k: number of most activated memories. Default: 5.
            apply_norm, include_bias: lens options of :meth:`ModelAdapter.project`.
            internal_batch_size: chunk size for tensor inputs.
        Returns:
            dict of float64 (num_blocks,) percentages: ``"all"`` (every token), ``"image"``
            and, for class-token models, ``"cls"``.
        """
        self._check_options(layer, k)
        nb = self.adapter.num_blocks
        memory_top1 = [self.value_projection(b, layer).argmax(0) for b in range(nb)]
        lens = dict(apply_norm=apply_norm, include_bias=include_bias)
        acc = RateAccumulator(nb)
        groups = token_groups(self.adapter)
        seen = 0
        for x, _, _ in iter_batches(self.adapter, inputs, None, None, internal_batch_size):
            _, idx, top1 = self._key_indices(x, layer, k, with_output_top1=True, lens_kwargs=lens)
            match = torch.stack(
                [(memory_top1[b].to(idx[b].device)[idx[b]] == top1[b][..., None]).any(-1) for b in range(nb)],
                1,
            )  # (N, blocks, T)
            seen += x.shape[0]
            acc.add_mask("all", match)
            for name, pos in groups.items():
                m = match[:, :, pos]
                acc.add_mask(name, m[..., None] if m.dim() == 2 else m)
        if seen == 0:
            raise InputValidationError("inputs hold no images")
        return {name: acc.percent(name) for name in ["all", *groups]}
