"""The uniform view of a ViT that every analysis consumes.

An adapter reads the modules of an unmodified model and exposes, per block, the pieces of
the computation (norms, q/k/v, output projection, MLP) so that one generic decomposed
forward (``captum_clsemb.trace``) can run it while recording everything by name. It never
edits the model: no hooks, no flag changes (fused attention / attention implementation are
left alone because attention is recomputed explicitly from the same weights). The only
state touched is train/eval mode, which :meth:`ModelAdapter.eval_mode` restores.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from captum_clsemb._utils import check_finite
from captum_clsemb.errors import InputValidationError

QKVFn = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]

# what the classifier head reads, by ``ModelAdapter.pooling``
HEAD_READS = {
    "token": "the class token",
    "avg": "the mean of the patch tokens (global average pooling)",
    "cls+avg": "the class token concatenated with the mean of the patch tokens",
    "map": "an attention-pooled summary of all tokens (attention-pooling head)",
}


def identity(x: Tensor) -> Tensor:
    return x


class LayerScale(nn.Module):
    r"""Elementwise gain ``x * gamma`` over a model's own parameter (held by reference, not copied).

    Families that keep layer scale as a bare parameter (timm Eva / BEiT ``gamma_1``, Hugging
    Face BEiT ``lambda_1``, DINOv2 ``layer_scale1.lambda1``) expose it through this module,
    so that every consumer sees one kind of layer scale with a ``gamma``, like timm's.
    """

    def __init__(self, gamma: Tensor) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class LinearView(nn.Module):
    r"""A linear map ``x W^T + b`` whose weight and bias are computed, on each access, from the
    model's own parameters (e.g. a head made of several layers folded into one matrix).

    Readers use it like an ``nn.Linear`` (``weight``, ``bias``, ``in_features``,
    ``out_features``, call); it holds no parameters of its own, so it never goes stale.
    """

    def __init__(self, weight: Callable[[], Tensor], bias: Callable[[], Tensor | None]) -> None:
        super().__init__()
        self._weight_fn = weight
        self._bias_fn = bias

    @property
    def weight(self) -> Tensor:
        return self._weight_fn()

    @property
    def bias(self) -> Tensor | None:
        return self._bias_fn()

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class ConstantFactor(nn.Module):
    r"""A step of a classifier head that multiplies its input by a positive per-example factor.

    ``y = c(x) x`` with ``c(x) > 0`` a scalar per example (an L2 normalisation, a logit
    scale). Relevance methods hold the factor constant: an elementwise linear map whose
    relevance passes through unchanged (see :attr:`ModelAdapter.head_path`).
    """


class L2Normalize(ConstantFactor):
    r"""``x / ||x||_2`` over the last dimension (the image embedding of CLIP-style heads)."""

    def forward(self, x: Tensor) -> Tensor:
        return x / x.norm(p=2, dim=-1, keepdim=True)


class Scale(ConstantFactor):
    r"""``x * s`` with a positive scalar ``s`` read, on each call, from the model (a logit scale)."""

    def __init__(self, factor: Callable[[], Tensor]) -> None:
        super().__init__()
        self._factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self._factor()


@dataclass(frozen=True)
class BlockParts:
    r"""The computation of one transformer block, as callables over the model's own modules.

    A block computes, with ``x`` the residual stream entering it::

        q, k, v = qkv(norm1(x))                       # each (N, heads, T, head_dim)
        q, k = rope(q, k)                             # only when set
        A = softmax(q k^T * scale + attn_bias)        # attention probabilities (bias only when set)
        z = concat_h(A_h v_h)                         # attention key coefficients (N, T, heads*head_dim)
        attn_out = attn_post(proj(attn_out_norm(z)))  # added to the residual
        mid = x + attn_out
        keys = act(fc1(norm2(mid)))                   # MLP key coefficients (mlp_in if set:
                                                      #   gated MLPs, keys = mlp_gate(u) * fc1(u))
        mlp_out = mlp_post(fc2(mlp_mid_norm(keys)))   # added to the residual
        out = mid + mlp_out

    Pre-norm blocks have ``attn_post``/``mlp_post`` = layer scale (or identity); post-norm
    blocks (timm ``ResPostBlock``) have ``norm1``/``norm2`` = identity and the block norms as
    ``attn_post``/``mlp_post``.
    """

    norm1: Callable[[Tensor], Tensor]
    qkv: QKVFn
    scale: float
    attn_out_norm: Callable[[Tensor], Tensor]
    proj: nn.Linear
    attn_post: Callable[[Tensor], Tensor]
    norm2: Callable[[Tensor], Tensor]
    fc1: nn.Linear
    act: Callable[[Tensor], Tensor]
    mlp_mid_norm: Callable[[Tensor], Tensor]
    fc2: nn.Linear
    mlp_post: Callable[[Tensor], Tensor]
    scale_before_matmul: bool = True  # timm scales q first; HF scales q k^T (same maths, float order differs)
    # the stacked q/k/v projection weight (3 * heads * head_dim, d), rows in (q|k|v, head, dim) order, for
    # methods that need the weight itself (LRP)
    qkv_weight: Tensor | None = None
    # True when qkv(u) is exactly the heads of the projection u qkv_weight^T + qkv_bias (no q/k norm; a
    # rope is applied after it, separately): methods can then read the projection's output back from
    # (q, k, v) instead of recomputing it (LRP's denominators). False when unknown.
    qkv_is_projection: bool = False
    qkv_bias: Tensor | None = None
    # Extension points for families beyond the plain ViT (None for it). Each receives the traced
    # sequence's model-order token index (N, T') (prefix tokens first, then patch positions), or None
    # when the sequence is the full one, so that dropped tokens keep their own positions.
    # rope(q, k, token_index) -> (q, k): rotary position embedding applied after the q/k projection.
    rope: Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]] | None = None
    # attn_bias(token_index) -> additive attention-score bias broadcastable to (N, heads, T', T')
    # (relative position bias), added after scaling and before the softmax.
    attn_bias: Callable[[Tensor | None], Tensor] | None = None
    # mlp_in(normed) -> MLP key coefficients (N, T, M), replacing act(fc1(normed)) (e.g. SwiGLU).
    mlp_in: Callable[[Tensor], Tensor] | None = None
    # Gated MLPs (SwiGLU / GLU): mlp_gate(normed) -> the gate multiplier act(gate(normed)) (N, T, M),
    # such that mlp_in(normed) == mlp_gate(normed) * fc1(normed) with fc1 the signal branch; methods
    # that treat the gate as a constant multiplier (LRP) need it. None for plain MLPs.
    mlp_gate: Callable[[Tensor], Tensor] | None = None

    def mlp_keys(self, normed: Tensor) -> Tensor:
        """MLP key coefficients of the (already normed) MLP input."""
        return self.mlp_in(normed) if self.mlp_in is not None else self.act(self.fc1(normed))


class ModelAdapter(abc.ABC):
    r"""Base class: a uniform decomposed view of one ViT family.

    Attributes set by subclasses:
        model: the wrapped model (never modified).
        family: ``"timm"`` or ``"hf"`` (whose initialisation the random baselines use).
        num_blocks, num_heads, head_dim, embed_dim, num_classes: sizes.
        prefix_tokens: names of the tokens before the patches, in model order, each one of
            ``"cls"``, ``"dist"`` (DeiT distillation token), ``"reg"`` (register token).
        pooling: ``"token"`` (class-token models, incl. distilled), ``"avg"`` (GAP),
            ``"cls+avg"`` (a head reading the class token and the patch mean, DINOv2) or
            ``"map"`` (attention-pooling head, SigLIP).
        class_names: list of class names when the model carries them, else None.
    """

    model: nn.Module
    family: str
    num_blocks: int
    num_heads: int
    head_dim: int
    embed_dim: int
    num_classes: int
    prefix_tokens: tuple[str, ...]
    pooling: str
    class_names: list[str] | None = None

    # -- structure ---------------------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        return len(self.prefix_tokens)

    @property
    def has_class_token(self) -> bool:
        return "cls" in self.prefix_tokens

    @property
    def reads_class_token(self) -> bool:
        """Whether the classifier head reads the class token (False for mean / attention pooling)."""
        return self.has_class_token and self.pooling in ("token", "cls+avg")

    # a description of the classifier path when it is not a chain of linear maps and constant
    # factors (:attr:`head_path` is then None), e.g. an attention-pooling head
    head_structure: str | None = None

    @property
    def model_name(self) -> str:
        """The model's class name, as messages show it."""
        return type(self.model).__name__

    @property
    def head_reads(self) -> str:
        """What the classifier head reads, in words (from :attr:`pooling`)."""
        return HEAD_READS.get(self.pooling, f"its tokens pooled as {self.pooling!r}")

    @property
    def head_path(self) -> tuple[nn.Module, ...] | None:
        r"""The classifier head after pooling, as a chain of steps applied in order.

        The chain's input is what the head reads after :meth:`post_pool_norm`: the class
        token (``pooling="token"``), the mean of the patch tokens (``"avg"``) or their
        concatenation ``[class token, patch mean]`` (``"cls+avg"``). Each step is a linear map
        (``weight``, ``bias``: an ``nn.Linear`` or :class:`LinearView`) or a
        :class:`ConstantFactor` (L2 normalisation, logit scale); the chain's output is the
        logits (for distilled models, the class-token head's: :attr:`head_dist` adds the
        other half). Relevance methods (LRP) propagate through it step by step. None when
        the head is not such a chain (see :attr:`head_structure`). Default: ``(head,)``.
        """
        return (self.head,)

    def lrp_missing_rules(self) -> list[str]:
        r"""The parts of this model that layer-wise relevance propagation has no rule for.

        Rules exist for the plain ViT block and for rotary position embeddings, relative
        position biases, gated MLPs that expose their gate (:attr:`BlockParts.mlp_gate`) and
        heads that are chains of linear maps and constant factors (:attr:`head_path`).
        Methods built on LRP (Chefer et al.) refuse models for which this is non-empty
        rather than propagate through a part they treat wrongly.
        """
        missing: list[str] = []
        inner = self.num_heads * self.head_dim
        for b in range(self.num_blocks):
            p = self.block(b)
            if p.mlp_in is not None and p.mlp_gate is None:
                what = "an MLP whose key coefficients are not a gate times a linear signal branch"
                if what not in missing:
                    missing.append(what)
            w = p.qkv_weight
            if w is None or tuple(w.shape) != (3 * inner, self.embed_dim):
                what = (
                    "attention without one (3 * heads * head_dim, embed_dim) q/k/v projection "
                    "(e.g. grouped-query attention, k and v shared across heads)"
                )
                if what not in missing:
                    missing.append(what)
        if self.head_path is None:
            missing.append(self.head_structure or f"a classifier head that reads {self.head_reads}")
        return missing

    @property
    def class_token_index(self) -> int:
        if not self.has_class_token:
            raise InputValidationError(
                f"{self.model_name} has no class token: its head reads {self.head_reads}; "
                "this analysis needs a class-token model"
            )
        return self.prefix_tokens.index("cls")

    @property
    @abc.abstractmethod
    def img_size(self) -> tuple[int, int]: ...

    @property
    @abc.abstractmethod
    def patch_size(self) -> tuple[int, int]: ...

    @property
    @abc.abstractmethod
    def in_chans(self) -> int: ...

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the patch grid at the model's image size."""
        (ih, iw), (ph, pw) = self.img_size, self.patch_size
        return ih // ph, iw // pw

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @abc.abstractmethod
    def block(self, index: int) -> BlockParts: ...

    # -- classification path -------------------------------------------------------------
    @property
    @abc.abstractmethod
    def head(self) -> nn.Linear:
        """The classifier head (for distilled models: the class-token head)."""
        ...

    @property
    def head_dist(self) -> nn.Linear | None:
        """The distillation head of DeiT-distilled models, else None."""
        return None

    @property
    def class_embedding(self) -> Tensor:
        """E, the class embedding matrix (num_classes, embed_dim): rows are class prototypes."""
        return self.head.weight

    @property
    def class_bias(self) -> Tensor | None:
        return self.head.bias

    @abc.abstractmethod
    def pre_pool_norm(self, states: Tensor) -> Tensor:
        """The norm applied to every token before pooling (``model.norm``; identity for GAP)."""
        ...

    @abc.abstractmethod
    def post_pool_norm(self, pooled: Tensor) -> Tensor:
        """The norm applied after pooling (timm ``fc_norm`` of GAP models; else identity)."""
        ...

    def final_norm(self, states: Tensor) -> Tensor:
        """The normalisation the classification path applies to a token state.

        Class-token models: the final norm (``model.norm`` / ``layernorm``). GAP models: the
        ``fc_norm`` applied after pooling, here applied per token.
        """
        return self.post_pool_norm(self.pre_pool_norm(states))

    @abc.abstractmethod
    def embed(self, pixel_values: Tensor) -> Tensor:
        """Tokens after patch + position embedding (and any pre-norm), (N, T, d)."""
        ...

    def classify(self, final_states: Tensor) -> Tensor:
        """Logits from the residual stream after the last block, exactly as the model pools."""
        normed = self.pre_pool_norm(final_states)
        if self.pooling == "avg":
            pooled = normed[:, self.num_prefix_tokens :].mean(1)
            return self.head(self.post_pool_norm(pooled))
        normed = self.post_pool_norm(normed)
        logits = self.head(normed[:, self.class_token_index])
        if self.head_dist is not None:
            logits = (logits + self.head_dist(normed[:, self.prefix_tokens.index("dist")])) / 2
        return logits

    def project(
        self, states: Tensor, *, apply_norm: bool = True, include_bias: bool = True, head: str = "cls"
    ) -> Tensor:
        r"""The class embedding lens: logits of any token state through the model's own path.

        ``states`` is (..., d). Class-token models: final norm then head (with bias). GAP
        models: ``fc_norm`` then head per token (pooling is linear and comes before
        ``fc_norm``, so a single token is classified as if it were the pooled vector).

        Args:
            states: token states, (..., embed_dim).
            apply_norm: apply the final norm (the paper's formula ``E x`` omits it; the
                authors' code applies it). Default: True.
            include_bias: add the head bias. Default: True.
            head: ``"cls"`` (the classifier head), or for DeiT-distilled models ``"dist"``
                (the distillation head) or ``"mean"`` (their average, as the model's output).
        Returns:
            logits, (..., num_classes).
        """
        x = self.final_norm(states) if apply_norm else states
        heads = [self.head]
        if head in ("dist", "mean"):
            if self.head_dist is None:
                raise InputValidationError(
                    f"head={head!r} needs a distilled model with two heads; use head='cls'"
                )
            heads = [self.head_dist] if head == "dist" else [self.head, self.head_dist]
        elif head != "cls":
            raise InputValidationError(f"head must be 'cls', 'dist' or 'mean', got {head!r}")
        out = None
        for h in heads:
            y = torch.nn.functional.linear(x, h.weight, h.bias if include_bias else None)
            out = y if out is None else out + y
        return out / len(heads)

    # -- input checks and mode handling --------------------------------------------------------
    def check_inputs(self, inputs: object) -> Tensor:
        r"""Validate an image batch, returning it; raise InputValidationError naming the fix.

        Checks, in order: a tensor (or a 1-tuple of one tensor, Captum's form) of shape
        (N, C, H, W), floating point, on the model's device, in the model's dtype, with the
        model's channels and image size, at least one image, and finite values (one
        ``isfinite`` reduction; :class:`~captum_clsemb.errors.NonFiniteInputError` lists the
        offending example indices). Every attribution, metric and analysis calls it first.
        """
        if isinstance(inputs, tuple) and len(inputs) == 1:
            inputs = inputs[0]
        if not isinstance(inputs, Tensor):
            raise InputValidationError(
                f"inputs must be a float tensor of images (N, C, H, W), got {type(inputs).__name__}"
            )
        if inputs.dim() != 4:
            raise InputValidationError(
                f"inputs must be a batch of images (N, C, H, W), got shape {tuple(inputs.shape)}; "
                "add a batch dimension with x.unsqueeze(0)"
            )
        if not inputs.is_floating_point():
            raise InputValidationError(
                f"inputs must be floating point (normalised pixel values), got {inputs.dtype}; "
                "apply the model's preprocessing (e.g. timm.data.create_transform) or x.float()"
            )
        param = next(self.model.parameters())
        if inputs.device != param.device:
            raise InputValidationError(
                f"inputs are on device {inputs.device} but the model is on {param.device}; move the images "
                f"with x.to({str(param.device)!r}) (or the model with model.to({str(inputs.device)!r}))"
            )
        if inputs.dtype != param.dtype:
            raise InputValidationError(
                f"inputs are {inputs.dtype} but the model's weights are {param.dtype}; cast with x.to({param.dtype})"
            )
        if inputs.shape[1] != self.in_chans:
            raise InputValidationError(
                f"the model expects {self.in_chans} channels, got {inputs.shape[1]}; convert images to RGB"
            )
        if tuple(inputs.shape[2:]) != tuple(self.img_size):
            h, w = self.img_size
            raise InputValidationError(
                f"wrong image size {inputs.shape[2]}x{inputs.shape[3]}: {type(self.model).__name__} expects "
                f"{h}x{w}; resize with the model's preprocessing (timm.data.resolve_data_config + create_transform, "
                "or the Hugging Face image processor)"
            )
        if inputs.shape[0] == 0:
            raise InputValidationError(
                "inputs hold no images (a batch of size 0); pass at least one image (N >= 1)"
            )
        check_finite(inputs)
        return inputs

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Run in eval mode (dropout off); restore every module's own train/eval flag after."""
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for m, was_training in flags:
                m.training = was_training

    @abc.abstractmethod
    def model_logits(self, pixel_values: Tensor) -> Tensor:
        """Plain logits of the wrapped model (its own forward)."""
        ...

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.model).__name__}: blocks={self.num_blocks}, heads={self.num_heads}, "
            f"dim={self.embed_dim}, classes={self.num_classes}, prefix={self.prefix_tokens}, grid={self.grid_size}, "
            f"pooling={self.pooling!r})"
        )
