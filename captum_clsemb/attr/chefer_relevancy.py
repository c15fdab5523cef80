r"""Chefer, Gur & Wolf (CVPR 2021), "Transformer Interpretability Beyond Attention Visualization".

The "transformer attribution" map: LRP relevance of every block's attention probabilities,
weighted by their gradient, rolled out over the blocks. The LRP rules follow the authors'
``modules/layers_ours.py`` and ``baselines/ViT/ViT_LRP.py`` (Transformer-Explainability) and
are written here as small batched functions over tensors so they can be checked in isolation:

=====================================  =============================================================
module                                 rule (function)
=====================================  =============================================================
classifier output                      relevance initialised to one-hot(target) (value 1, not the logit)
Linear (head, qkv, proj, fc1, fc2)     LRP-alpha1-beta0, one shared denominator, bias ignored
                                       (:func:`lrp_linear_alpha1_beta0`)
LayerNorm, GELU, Softmax, Dropout,     relevance passes through unchanged
q/k norms, attention scale
matmuls Q K^T and A V                  z-rule on both operands, each operand's relevance halved
                                       (:func:`lrp_matmul_z`); R_A after halving is kept
residual Add                           z-rule, then rescaled to conserve the total per example
                                       (:func:`lrp_add_conserving`)
Clone (branch point)                   sum of the branch relevances (``clone_rule="exact"``), or
                                       the authors' ``Clone.relprop`` (``clone_rule="chefer"``,
                                       :func:`lrp_clone`)
CLS pooling (index select)             z-rule (:func:`lrp_select_z`)
layer scale (timm ``init_values``)     elementwise linear layer, z-rule (:func:`lrp_elementwise_z`)
=====================================  =============================================================

Rules for the parts of other ViT families, in the same spirit (every one conserves relevance):

=====================================  =============================================================
rotary position embedding (timm Eva)   linear in q (and k): the z-rule of that linear map, i.e. of
                                       each channel pair's 2x2 rotation (:func:`lrp_linear_map_z`);
                                       unrotated prefix tokens pass
relative position bias (BEiT)          a constant term of the scores, like a Linear's bias: takes
                                       no relevance, R_A goes to ``Q K^T`` whole
gated MLP (SwiGLU, GLU)                ``act(gate(u)) * fc1(u)``: the gate is a constant multiplier
                                       (its elementwise z-rule passes), all relevance to the signal
                                       branch ``fc1``, then alpha1-beta0; the gate branch gets none
head chains (CLIP zero-shot)           linear maps (projection, class matrix) alpha1-beta0; L2
                                       normalisation and logit scale are constant factors: pass
mean of the patch tokens (DINOv2's     z-rule (:func:`lrp_mean_z`); DINOv2's classifier over
second half, mean pooling)             ``[cls, patch mean]`` is one Linear, so alpha1-beta0 splits
                                       the relevance between the halves
=====================================  =============================================================

Then, per block b >= ``start_block``: ``Abar_b = mean_h((dy_t/dA_b * R_{A_b})^+)`` and
``C = (Abar_B + I) ... (Abar_s + I)`` (no row normalisation); the map is the class-token
row of C over the image tokens. For a head that reads more than the class token, the map
is ``seed C``, the row vector ``seed`` holding each token's weight in the head's input
(class token 1, each patch 1/P), each reader weighted by its share of the head's relevance:
DINOv2 ``rho_cls C[cls] + rho_mean mean_j C[patch_j]``; mean pooling
(``readout="patch_mean"``, an explicit option) ``mean_j C[patch_j]``.

The one rule that differs from the authors' code is the branch point. Their
``Clone.relprop`` computes ``R = X * sum_i safe_divide(R_i, X)``, i.e. it multiplies the sum
of the branch relevances by ``X / (X + 1e-9)`` (and zeroes it where ``X == 0``). That factor
is not part of the method (a branch point has no weights: its relevance is the sum), it
breaks conservation, and it differs from 1 only for residual-stream entries near 1e-9 or
exactly zero, so the default is the exact sum. ``clone_rule="chefer"`` applies their rule at
both branch points of every block (the block input and the attention output, where
``ViT_LRP.Block`` has its ``clone1``/``clone2``) and reproduces their maps to float precision.

Half precision: the forward runs in the model's dtype, the relevance rules in float32
(the 1e-9 stabiliser underflows in float16); maps of float16/bfloat16 models are float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from captum.attr import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_clsemb._utils import TargetType, format_target
from captum_clsemb.adapters import ModelAdapter, adapt
from captum_clsemb.adapters.base import BlockParts, ConstantFactor, LayerScale
from captum_clsemb.attr._explanation_utils import (
    captum_attribute,
    check_batch_size,
    check_grad_mode,
    check_interpolate_to,
)
from captum_clsemb.errors import InputValidationError, UnsupportedModelError
from captum_clsemb.trace import run_block
from captum_clsemb.trace.forward import classifier_prefix

_EPS = 1e-9
CLONE_RULES = ("exact", "chefer")
READOUTS = (None, "patch_mean")
# what the head reads, in the order of its input, by adapter.pooling
_READERS = {"token": ("cls",), "cls+avg": ("cls", "patch_mean"), "avg": ("patch_mean",)}


# -- LRP rules: pure, batched functions ------------------------------------------------------------
def safe_divide(a: Tensor, b: Tensor) -> Tensor:
    r"""``a / b`` stabilised as in the authors' ``safe_divide``: ``a / (b + 1e-9)``, 0 where ``b == 0``."""
    # The authors' clamp(b, min=eps) + clamp(b, max=eps) is exactly b + eps (max + min of {b, eps});
    # it is 0 only where b == -eps, where they divide by eps.
    den = b + _EPS
    den.masked_fill_(den == 0, _EPS)
    return torch.div(a, den).masked_fill_(b == 0, 0)


def _relevance_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the rules run in: float32 for half-precision models, else the model's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _WeightParts:
    """``W^+``, ``W^-`` and ``|W|`` of one weight at a time, written into buffers that are reused
    from one layer to the next (so each layer does not allocate, and fault in, fresh pages)."""

    def __init__(self) -> None:
        self.buf: Tensor | None = None

    def __call__(self, weight: Tensor, with_abs: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        n = weight.numel()
        if (
            self.buf is None
            or self.buf.shape[1] < n
            or self.buf.dtype != weight.dtype
            or self.buf.device != weight.device
        ):
            self.buf = torch.empty(3, n, dtype=weight.dtype, device=weight.device)
        pw, nw, aw = (self.buf[i, :n].view(weight.shape) for i in range(3))
        torch.clamp(weight, min=0, out=pw)
        torch.clamp(weight, max=0, out=nw)
        return pw, nw, torch.abs(weight, out=aw) if with_abs else None


def _linear_relprop(
    x: Tensor,
    weight: Tensor,
    relevance: Tensor,
    y: Tensor | None = None,
    bias: Tensor | None = None,
    parts: _WeightParts | None = None,
) -> Tensor:
    """LRP-alpha1-beta0 (:func:`lrp_linear_alpha1_beta0`), optionally reusing the forward's output.

    ``y``, when given, is the forward's output ``x W^T + bias`` (overwritten: a scratch buffer).
    Then the shared denominator ``z^+ = sum_i (x_i w_ji)^+`` is ``(x W^T + |x| |W|^T) / 2``, one
    product instead of two. The relevance itself is always ``x^+ (s W^+) + x^- (s W^-)`` with
    ``s = R / z^+``, which multiplies ``s_j`` only by positive contributions and so stays
    bounded by the relevance of the outputs even where ``z^+`` is tiny.
    """
    pw, nw, aw = (parts or _WeightParts())(weight, with_abs=y is not None)
    if y is None:
        z_plus = F.linear(x.clamp(min=0), pw).add_(F.linear(x.clamp(max=0), nw))
        zero = z_plus == 0
        s = torch.div(relevance, z_plus.add_(_EPS)).masked_fill_(zero, 0)
    else:
        # z^+ + 1e-9 = y/2 + |x| |W|^T / 2 - (bias/2 - 1e-9), the product accumulated onto y/2.
        den = y.view(-1, y.shape[-1]).addmm_(x.abs().view(-1, x.shape[-1]), aw.t(), beta=0.5, alpha=0.5)
        den = den.view(y.shape)
        den.sub_(-_EPS if bias is None else bias * 0.5 - _EPS)
        # z^+ <= 0 (exactly 0, or rounding below it): no positive contribution, no relevance
        s = torch.div(relevance, den).masked_fill_(den <= _EPS, 0)
    return (s @ pw).mul_(x.clamp(min=0)).addcmul_(s @ nw, x.clamp(max=0))


def lrp_linear_alpha1_beta0(x: Tensor, weight: Tensor, relevance: Tensor) -> Tensor:
    r"""LRP-alpha1-beta0 through ``y = x W^T (+ b)``, as ``layers_ours.Linear.relprop(alpha=1)``.

    Only positive contributions ``x_i w_ji > 0`` receive relevance, over one shared
    denominator ``z_j^+ = sum_i (x_i^+ w_ji^+ + x_i^- w_ji^-)``::

        R_i = sum_j x_i w_ji [x_i w_ji > 0] R_j / z_j^+

    The bias takes no relevance and is not in the denominator, so the rule conserves
    relevance exactly (up to the 1e-9 stabiliser) for every output with ``z_j^+ > 0``.

    Args:
        x: layer input, (..., in_features).
        weight: (out_features, in_features).
        relevance: relevance of the outputs, (..., out_features).
    Returns:
        relevance of the inputs, (..., in_features).
    """
    return _linear_relprop(x, weight, relevance)


def lrp_matmul_z(a: Tensor, b: Tensor, relevance: Tensor, halve: bool = True) -> tuple[Tensor, Tensor]:
    r"""z-rule through the bilinear product ``Z = a @ b`` for both operands (``layers_ours.einsum``).

    ``R_a = a * ((R / Z) @ b^T)`` and ``R_b = b * (a^T @ (R / Z))``: gradient times input with
    the stabilised division. Z is homogeneous of degree 1 in each operand, so each operand
    receives the total relevance; with ``halve`` (the authors' ``cam /= 2`` in
    ``Attention.relprop``) each then gets half of it and the pair conserves the total.

    Args:
        a: (..., n, k).
        b: (..., k, m).
        relevance: relevance of Z, (..., n, m).
        halve: divide both operand relevances by 2. Default: True.
    Returns:
        ``(R_a, R_b)`` with the shapes of ``a`` and ``b``.
    """
    return _matmul_relprop(a, b, a @ b, relevance, halve)


def _matmul_relprop(
    a: Tensor, b: Tensor, z: Tensor, relevance: Tensor, halve: bool = True
) -> tuple[Tensor, Tensor]:
    """:func:`lrp_matmul_z` with the product ``z = a @ b`` given (the forward's own)."""
    s = safe_divide(relevance, z)
    if halve:  # exact: halving s halves both products
        s = s.mul_(0.5)
    return (s @ b.transpose(-1, -2)).mul_(a), (a.transpose(-1, -2) @ s).mul_(b)


def lrp_add_conserving(a: Tensor, b: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    r"""Residual ``a + b``: z-rule, then rescaling that conserves total relevance (``layers_ours.Add``).

    With ``r_a = a R / (a + b)`` (likewise ``r_b``) and per-example totals ``S_a = sum r_a``,
    ``S_b = sum r_b``, ``S = sum R``::

        R_a = r_a * (|S_a| / (|S_a| + |S_b|)) * S / S_a

    so ``sum R_a + sum R_b = sum R`` for every example. The authors sum over the whole
    tensor with batch size 1; here the sums run over all dims but the first (per example).

    Args:
        a, b: the operands, (N, ...).
        relevance: relevance of the sum, (N, ...).
    Returns:
        ``(R_a, R_b)``.
    """
    return _add_relprop(a, b, a + b, relevance)


def _add_relprop(a: Tensor, b: Tensor, total_ab: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`lrp_add_conserving` with the sum ``total_ab = a + b`` given (the forward's own)."""
    s = safe_divide(relevance, total_ab)
    ra, rb = a * s, s.mul_(b)
    dims = tuple(range(1, relevance.dim()))
    sa, sb = ra.sum(dims, keepdim=True), rb.sum(dims, keepdim=True)
    total = relevance.sum(dims, keepdim=True)
    norm = sa.abs() + sb.abs()
    fa = safe_divide(sa.abs(), norm) * total
    fb = safe_divide(sb.abs(), norm) * total
    return ra.mul_(safe_divide(fa, sa)), rb.mul_(safe_divide(fb, sb))


def lrp_select_z(x: Tensor, index: int, relevance: Tensor) -> Tensor:
    r"""z-rule through ``y = x[:, index]`` (the class-token pooling, ``layers_ours.IndexSelect``).

    Args:
        x: token states (N, T, d).
        index: the selected token.
        relevance: relevance of the selected state, (N, d).
    Returns:
        (N, T, d): ``x[:, index] * R / x[:, index]`` at ``index``, zero elsewhere.
    """
    out = torch.zeros_like(x)
    sel = x[:, index]
    out[:, index] = sel * safe_divide(relevance, sel)
    return out


def lrp_mean_z(x: Tensor, relevance: Tensor) -> Tensor:
    r"""z-rule through the mean over tokens ``y = mean_j x_j`` (mean pooling of the patch tokens).

    The contribution of token ``j`` to ``y`` is ``x_j / K``::

        R_j = (x_j / K) * R / y          (per channel, stabilised division)

    which conserves relevance per channel wherever ``y != 0``.

    Args:
        x: the averaged token states (N, K, d).
        relevance: relevance of the mean, (N, d).
    Returns:
        (N, K, d).
    """
    s = safe_divide(relevance, x.mean(1)).unsqueeze(1)
    return (x / x.shape[1]).mul_(s)


def lrp_linear_map_z(
    fn: Callable[..., Tensor | tuple[Tensor, ...]],
    inputs: tuple[Tensor, ...],
    relevance: tuple[Tensor, ...],
) -> tuple[Tensor, ...]:
    r"""z-rule through a bias-free linear map ``y = fn(x)`` of one or more inputs (rotary embedding).

    With ``y = M x``, the contribution of ``x_i`` to ``y_j`` is ``M_ji x_i``, so::

        R_x = x * M^T (R_y / y)            (stabilised division)

    ``M^T s`` is the vector-Jacobian product of ``fn`` (exact for a linear map, at any point).
    The rule conserves relevance (``sum R_x = sum R_y`` wherever ``y != 0``). For a map
    that acts on pairs of channels, like a rotary position embedding (a 2x2 rotation per
    pair, per token), it is the z-rule of each pair's 2x2 map: ``M`` is block diagonal.

    Args:
        fn: the linear map, called as ``fn(*inputs)``; returns one tensor or a tuple.
        inputs: its inputs.
        relevance: relevance of its outputs, one per output.
    Returns:
        the relevance of each input.
    """
    with torch.enable_grad():
        xs = [x.detach().requires_grad_(True) for x in inputs]
        ys = fn(*xs)
        ys = (ys,) if isinstance(ys, Tensor) else tuple(ys)
        cot = [safe_divide(r, y.detach()) for r, y in zip(relevance, ys)]
        grads = torch.autograd.grad(ys, xs, cot)
    return tuple(g.mul_(x) for g, x in zip(grads, inputs))


def lrp_elementwise_z(x: Tensor, scale: Tensor, relevance: Tensor) -> Tensor:
    r"""z-rule through an elementwise linear layer ``y = x * scale`` (timm layer scale).

    Each output has a single contribution, so the relevance passes through unchanged
    except where ``y == 0`` (then 0): ``R_x = x * scale * R / (x * scale)``.
    """
    y = x * scale
    return y * safe_divide(relevance, y)


def lrp_clone(x: Tensor, relevances: tuple[Tensor, ...] | list[Tensor], rule: str = "exact") -> Tensor:
    r"""Relevance of a branch point ``x`` from the relevances of its branches.

    ``rule="exact"``: the sum ``sum_i R_i``. ``rule="chefer"``: the authors'
    ``layers_ours.Clone.relprop``, ``x * sum_i safe_divide(R_i, x)``, i.e. the sum times
    ``x / (x + 1e-9)`` and 0 where ``x == 0``.
    """
    if rule == "exact":
        out = relevances[0]
        for r in relevances[1:]:
            out = out + r
        return out
    if rule == "chefer":
        acc = safe_divide(relevances[0], x)
        for r in relevances[1:]:
            acc = acc + safe_divide(r, x)
        return acc.mul_(x)
    raise InputValidationError(f"clone rule must be one of {CLONE_RULES}, got {rule!r}")


# -- model plumbing --------------------------------------------------------------------------------
def _qkv_weight(parts: BlockParts) -> Tensor:
    """The stacked q/k/v projection weight (3 * heads * head_dim, d), rows in (q|k|v, head, dim) order
    (its presence and shape are checked once, by ``adapter.lrp_missing_rules()``)."""
    return parts.qkv_weight


def _layer_scale(module: object) -> Tensor | None:
    """The gamma of a layer scale (timm ``LayerScale``, or the adapters' :class:`LayerScale` over a
    family's own gain: elementwise z-rule), else None (relevance passes through: identity, or the
    block norm of a post-norm block)."""
    if isinstance(module, LayerScale):
        return module.gamma
    try:
        from timm.layers import LayerScale as TimmLayerScale
    except ImportError:
        return None
    return module.gamma if isinstance(module, TimmLayerScale) else None


def _post_relprop(post: object, y: Tensor, relevance: Tensor) -> Tensor:
    """Relevance from a sub-layer output ``y = post(linear_out)`` back to the linear's output: the
    elementwise z-rule of a layer scale (``y = linear_out * gamma``), else unchanged."""
    if _layer_scale(post) is None:
        return relevance
    return safe_divide(relevance, y).mul_(y)


class CheferRelevancy(GradientAttribution):
    r"""Chefer et al. (CVPR 2021) transformer attribution: LRP relevance x gradient, rolled out.

    One decomposed forward (with an autograd graph from ``start_block`` on, also for models
    whose parameters are frozen); one backward of the target's pre-softmax logit gives
    ``dy_t/dA_b`` for all blocks at once; then the relevance one-hot(target) is propagated
    from the classifier output down to each block's attention probabilities with the
    authors' LRP rules (see the module docstring, all batched over the examples), reusing the
    forward's own tensors, giving ``R_{A_b}``.
    With ``Abar_b = mean_h((dy_t/dA_b * R_{A_b})^+)`` (heads averaged)::

        C = (Abar_{B-1} + I) (Abar_{B-2} + I) ... (Abar_s + I)      (no row normalisation)
        map = C[cls, image tokens]                                   on the patch grid

    ``s = start_block`` defaults to 1: the published ImageNet protocol
    (``generate_visualizations.py`` calls ``start_layer=1``) skips block 0.

    Supported: every model whose classifier reads the class token, and on request
    (``readout="patch_mean"``) models that average the patch tokens. Class-token ViTs: timm
    ``VisionTransformer`` with ``global_pool='token'``
    (register tokens, ``qkv_bias=False``, qk-norm and layer scale included; layer scale is
    an elementwise linear layer under the z-rule, so relevance passes through it), post-norm
    ``ResPostBlock`` (its block norms are norms: relevance passes through), DeiT-distilled
    two-head models (timm ``VisionTransformerDistilled``, HF
    ``DeiTForImageClassificationWithTeacher``: the output ``(head(cls) + head_dist(dist)) / 2``
    is a residual-type Add of the two halves, split by :func:`lrp_add_conserving`, each head
    then alpha1-beta0 and index-select into its own token; the map is still read from the
    class-token row), Hugging Face ``ViTForImageClassification`` / ``DeiTForImageClassification``;
    timm ``Eva`` (EVA-02, ``vit_*_rope_*``: rotary embeddings, SwiGLU / GLU, layer scale,
    post-norm blocks) and ``Beit`` / Hugging Face ``BeitForImageClassification`` (relative
    position bias) with class-token pooling; Hugging Face DINOv2 classifiers (the head reads
    ``[class token, patch mean]``: the map combines the class token's row and the patch rows,
    each by its share of the head's relevance); CLIP zero-shot classifiers
    (:class:`~captum_clsemb.zero_shot.ZeroShotClassifier`). The rules for these parts are in
    the module docstring.

    Refused, before any work, with what the head reads: models without a class token and
    heads that do not read it (:class:`InputValidationError`; mean-pooled heads, e.g. the
    released EVA-02 and BEiT classifiers, are explained with ``readout="patch_mean"``;
    SigLIP's attention-pooling head is not), and models with a part that has no rule,
    ``adapter.lrp_missing_rules()`` (:class:`UnsupportedModelError`; e.g. grouped-query
    attention).

    Args:
        forward_func: a supported timm or Hugging Face ViT (or its adapter).
        readout: the rollout rows the map reads. None (default): those of the tokens the head
            reads, for heads that read the class token (the class-token row; DINOv2 see
            above). ``"patch_mean"``: for heads that average the patch tokens (``pooling ==
            "avg"``), the mean of the patch tokens' rows, ``mean_j C[patch_j]``, with the
            relevance entering through the mean's z-rule. The class token's row does not
            explain such a head, so it must be asked for.

    Examples::

        >>> import timm
        >>> from captum_clsemb.attr.chefer_relevancy import CheferRelevancy
        >>> model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
        >>> cr = CheferRelevancy(model)
        >>> maps = cr.attribute(images, target=labels)                  # (N, 1, 14, 14)
        >>> up = cr.attribute(images, target=labels, interpolate_to=224)  # (N, 1, 224, 224)
        >>> eva = timm.create_model("eva02_base_patch14_224", pretrained=False, num_classes=10)
        >>> CheferRelevancy(eva, readout="patch_mean").attribute(eva_images)  # a mean-pooled head
    """

    def __init__(self, forward_func: nn.Module | ModelAdapter, readout: str | None = None) -> None:
        self.adapter = adapt(forward_func)
        GradientAttribution.__init__(self, self.adapter.model)
        self.readout = self._check_readout(readout)
        missing = self.adapter.lrp_missing_rules()
        if missing:
            instead = (
                "CheferGradientRollout or AttentionRollout"
                if self.adapter.has_class_token
                else "BlockwiseIdentifiability or the perturbation metrics"
            )
            raise UnsupportedModelError(
                f"CheferRelevancy has no LRP rule for parts of {self.adapter.model_name}: "
                f"{'; '.join(missing)}. Use {instead} for this model"
            )

    # -- public API ---------------------------------------------------------------------------------
    @log_usage(part_of_slo=True)
    @captum_attribute
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: None = None,
        start_block: int = 1,
        interpolate_to: int | tuple[int, int] | str | None = None,
        internal_batch_size: int | None = None,
        clone_rule: str = "exact",
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: images (N, C, H, W) preprocessed for the model, or a 1-tuple
                ``(images,)`` (the result is then a 1-tuple too).
            target: class per example in Captum's forms: int, 1-tuple, list of ints,
                tensor (N,) or (N, 1), list of 1-tuples; None uses the model's predicted
                class.
            additional_forward_args: must be None (the models take images only).
            start_block: first block in the rollout product. Default: 1, the authors'
                ImageNet protocol (block 0 skipped); 0 uses every block.
            interpolate_to: optional output size (int or (H, W)); the map is upsampled
                bilinearly (the authors upsample x16 bilinearly before display). ``"input"``
                gives (N, C, H, W) maps shaped like the inputs. The map is never min-max
                normalised (the authors normalise only for display).
            internal_batch_size: split the batch into chunks of this size.
            clone_rule: relevance of the residual-stream branch points: ``"exact"`` (default,
                the sum of the branch relevances) or ``"chefer"`` (the authors'
                ``Clone.relprop``, which rescales the sum by ``X / (X + 1e-9)``; use it to
                match their maps to float precision). See :func:`lrp_clone`.
        Returns:
            *Tensor* (N, 1, h, w) on the patch grid ``adapter.grid_size`` (or
            (N, 1, H, W) with ``interpolate_to``, (N, C, H, W) with ``"input"``),
            detached, float32 for float16/bfloat16 models (the rules run in float32); a
            1-tuple for tuple inputs.
        """
        adapter = self.adapter
        x = adapter.check_inputs(inputs)
        start = self._check_start_block(start_block)
        size = check_interpolate_to(interpolate_to)
        check_batch_size(internal_batch_size)
        n = x.shape[0]
        tgt = format_target(target, n, adapter.num_classes, x.device)
        h, w = adapter.grid_size
        p = adapter.num_prefix_tokens
        cls = adapter.class_token_index if adapter.has_class_token else None
        rule = self._check_clone_rule(clone_rule)
        maps = []
        for sl in self._chunks(n, internal_batch_size):
            row = None
            seed: list[Tensor | None] = [None]
            # Blocks arrive last to first. The map is the class-token row of
            # C = (Abar_{B-1} + I) ... (Abar_s + I) (or, for heads that read the patch mean, the
            # seed's combination of rows), so it is built from the left as a row vector:
            # row <- row (Abar_b + I) = row Abar_b + row.
            with torch.no_grad():  # the forward turns grad on for itself
                for rel, grad in self._relevance_and_grad(
                    x[sl], None if tgt is None else tgt[sl], start, rule, seed
                ):
                    layer = grad.mul_(rel).clamp_(min=0).mean(1)  # (n, T, T), heads averaged
                    del rel, grad
                    if row is None and seed[0] is None:  # the top block (its first query rows):
                        row = layer[:, cls].clone()  # class-token row + I
                        row[:, cls] += 1
                    else:
                        row = seed[0] if row is None else row
                        row = torch.baddbmm(row.unsqueeze(1), row.unsqueeze(1), layer).squeeze(1)
            maps.append(row[:, p:].reshape(-1, 1, h, w))
        out = torch.cat(maps, 0)
        if size is not None:
            out = LayerAttribution.interpolate(out, size, "bilinear")
        return out

    def attention_relevance(
        self,
        inputs: Tensor,
        target: TargetType = None,
        start_block: int = 0,
        internal_batch_size: int | None = None,
        clone_rule: str = "exact",
    ) -> tuple[Tensor, Tensor]:
        r"""The two ingredients of the map: LRP relevance and gradient of the attention probabilities.

        Args:
            inputs: images (N, C, H, W).
            target: as in :meth:`attribute`.
            start_block: first block returned. Default: 0 (all blocks).
            internal_batch_size: split the batch into chunks of this size.
            clone_rule: as in :meth:`attribute`.
        Returns:
            ``(R_A, dA)``, each (N, num_blocks - start_block, heads, T, T): the relevance
            ``R_{A_b}`` (after the matmul halving) and ``dy_t / dA_b``.
        """
        adapter = self.adapter
        check_grad_mode(self)
        x = adapter.check_inputs(inputs)
        start = self._check_start_block(start_block)
        check_batch_size(internal_batch_size)
        tgt = format_target(target, x.shape[0], adapter.num_classes, x.device)
        rule = self._check_clone_rule(clone_rule)
        rels, grads = [], []
        for sl in self._chunks(x.shape[0], internal_batch_size):
            with torch.no_grad():  # the forward turns grad on for itself
                pairs = [
                    (self._full_rows(r), self._full_rows(g))
                    for r, g in self._relevance_and_grad(
                        x[sl], None if tgt is None else tgt[sl], start, rule, [None]
                    )
                ][::-1]
            rels.append(torch.stack([r for r, _ in pairs], 1))
            grads.append(torch.stack([g for _, g in pairs], 1))
        return torch.cat(rels, 0), torch.cat(grads, 0)

    # -- internals ----------------------------------------------------------------------------------
    def _check_start_block(self, start_block: int) -> int:
        b = self.adapter.num_blocks
        if isinstance(start_block, bool) or not isinstance(start_block, int) or not 0 <= start_block < b:
            raise InputValidationError(
                f"start_block must be an int in 0..{b - 1} (the model has {b} blocks), got {start_block!r}; "
                "use start_block=0 for models with a single block"
            )
        return start_block

    def _check_readout(self, readout: str | None) -> str | None:
        """The readout, or one clear error saying what the head reads and what applies instead."""
        a = self.adapter
        name = a.model_name
        if readout is not None and (not isinstance(readout, str) or readout not in READOUTS):
            raise InputValidationError(
                "readout must be None (the tokens the head reads, for heads that read the class token) "
                f"or 'patch_mean' (heads that average the patch tokens), got {readout!r}"
            )
        reads_cls = a.has_class_token and a.pooling in ("token", "cls+avg")
        if readout == "patch_mean":
            if a.pooling == "avg":
                return readout
            instead = (
                "; use the default readout=None, which explains what this head reads"
                if reads_cls
                else ": Chefer et al.'s relevancy is not defined for it"
            )
            raise InputValidationError(
                f"readout='patch_mean' explains a head that averages the patch tokens, but the head of {name} "
                f"reads {a.head_reads}{instead}"
            )
        if reads_cls:
            return None
        if not a.has_class_token:
            what = f"{name} has no class token: its head reads {a.head_reads}"
        else:
            what = (
                f"{name} has a class token, but its head reads {a.head_reads}, not the class token, so the "
                "class token's rollout row would not explain the prediction"
            )
        if a.pooling == "avg":
            fix = (
                "Pass readout='patch_mean' to explain the mean of the patch tokens' rollout rows (the tokens "
                "the head averages)"
            )
        else:
            fix = (
                "The method is defined for heads that read the class token or the patch mean; "
                "BlockwiseIdentifiability, ValueVectorProjector and the perturbation metrics apply to this model"
            )
        raise InputValidationError(
            f"CheferRelevancy explains the rollout rows of the tokens the classifier reads; {what}. {fix}"
        )

    @staticmethod
    def _check_clone_rule(clone_rule: str) -> str:
        if not isinstance(clone_rule, str) or clone_rule not in CLONE_RULES:
            raise InputValidationError(f"clone_rule must be one of {CLONE_RULES}, got {clone_rule!r}")
        return clone_rule

    @staticmethod
    def _chunks(n: int, internal_batch_size: int | None) -> list[slice]:
        if internal_batch_size is not None and (
            isinstance(internal_batch_size, bool)
            or not isinstance(internal_batch_size, int)
            or internal_batch_size < 1
        ):
            raise InputValidationError(
                f"internal_batch_size must be a positive int, got {internal_batch_size!r}"
            )
        step = internal_batch_size or max(n, 1)
        return [slice(i, i + step) for i in range(0, n, step)]

    @staticmethod
    def _full_rows(t: Tensor) -> Tensor:
        """(n, H, k, T) first query rows -> (n, H, T, T), the other rows zero (identity when k = T)."""
        k, seq = t.shape[-2:]
        return t if k == seq else F.pad(t, (0, 0, 0, seq - k))

    def _relevance_and_grad(
        self, x: Tensor, target: Tensor | None, start: int, clone_rule: str, seed: list[Tensor | None]
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(R_A, dA)`` for blocks B-1 down to ``start``, in the relevance dtype.

        Each is (n, H, T, T), except for the last block of a class-token head: (n, H, k, T), its
        first k query rows, the tokens the classifier reads
        (:func:`~captum_clsemb.trace.forward.classifier_prefix`): the logits depend on no other
        row there, so those are exactly zero. ``seed[0]`` is set to the rollout seed (see
        :meth:`_head_relprop`) before the first pair is yielded.
        """
        blocks, final, logits = self._forward(x, start)
        if target is None:
            target = logits.detach().argmax(-1)
        # One backward for the batch (examples do not interact in eval mode) to every attention
        # matrix at once; the graph is then freed and LRP reuses the forward's own tensors.
        probs = [blk["attn_probs"] for blk in blocks]
        with torch.enable_grad():
            grads = list(torch.autograd.grad(logits.gather(1, target[:, None]).sum(), probs))
        del probs, logits
        blocks = [{k: v.detach() for k, v in blk.items()} for blk in blocks]
        # Callers consume this under torch.no_grad() (a context held across yields would leak).
        for b, rel in self._propagate(blocks, final.detach(), target, start, clone_rule, seed):
            grad = grads[b - start]
            grads[b - start] = None  # type: ignore[call-overload]
            yield rel, grad.to(rel.dtype)

    def _forward(self, x: Tensor, start: int) -> tuple[list[dict[str, Tensor]], Tensor, Tensor]:
        """One decomposed forward with an autograd graph from block ``start`` on.

        Returns the internals of blocks ``start..B-1`` (see :func:`run_block`, plus each block's
        input ``resid_pre``; the last block is computed only for the leading tokens that the
        classifier reads), the last block's output for those tokens and the logits.
        """
        adapter = self.adapter
        nb = adapter.num_blocks
        parts = [adapter.block(b) for b in range(nb)]
        top = classifier_prefix(adapter)
        blocks: list[dict[str, Tensor]] = []
        with adapter.eval_mode():
            with torch.no_grad():  # blocks below `start` are not explained: no graph, fused attention
                h = adapter.embed(x)
                for b in range(start):
                    h, _ = run_block(parts[b], h, b, frozenset())
            with torch.enable_grad():
                # The graph starts at block `start`'s input (so frozen parameters need no grad).
                h = h.detach().requires_grad_(True)
                for b in range(start, nb):
                    internals: dict[str, Tensor] = {"resid_pre": h}
                    prefix = top if b == nb - 1 else None
                    h, _ = run_block(parts[b], h, b, frozenset(), internals=internals, query_prefix=prefix)
                    blocks.append(internals)
                logits = adapter.classify(h)  # class-token heads: reads only the prefix tokens
        return blocks, h, logits

    def _propagate(
        self,
        blocks: list[dict[str, Tensor]],
        final: Tensor,
        target: Tensor,
        start: int,
        clone_rule: str,
        seed: list[Tensor | None],
    ) -> Iterator[tuple[int, Tensor]]:
        """LRP from one-hot(target) at the logits down to the blocks: yield (b, R_A_b), b = B-1..start.

        ``final`` is the last block's output at its first tokens (see :meth:`_forward`). Before
        the first block is yielded, ``seed[0]`` is set to the rollout seed of :meth:`_head_relprop`."""
        adapter = self.adapter
        nb = adapter.num_blocks
        cd = _relevance_dtype(final.dtype)
        # The final norm (and fc_norm) pass relevance unchanged.
        normed = adapter.pre_pool_norm(final).to(cd)
        r_out = F.one_hot(target, adapter.num_classes).to(cd)
        if adapter.head_dist is None:
            relevance, seed[0] = self._head_relprop(normed, r_out)
        else:
            cls = adapter.class_token_index
            head = adapter.head
            pooled = adapter.post_pool_norm(normed[:, cls])
            dist = adapter.prefix_tokens.index("dist")
            pooled_d = adapter.post_pool_norm(normed[:, dist])
            y_c = F.linear(pooled, head.weight.to(cd), _cast(head.bias, cd))
            y_d = F.linear(pooled_d, adapter.head_dist.weight.to(cd), _cast(adapter.head_dist.bias, cd))
            # logits = head(cls)/2 + head_dist(dist)/2: a two-operand Add (the /2 passes through).
            r_c, r_d = lrp_add_conserving(y_c / 2, y_d / 2, r_out)
            relevance = lrp_select_z(normed, cls, lrp_linear_alpha1_beta0(pooled, head.weight.to(cd), r_c))
            relevance = relevance + lrp_select_z(  # clone: the two token branches sum
                normed, dist, lrp_linear_alpha1_beta0(pooled_d, adapter.head_dist.weight.to(cd), r_d)
            )
        out = final
        scratch = _WeightParts()
        for b in reversed(range(start, nb)):
            saved = blocks[b - start]
            blocks[b - start] = {}  # release this block's tensors once used
            relevance, r_attn = self._block_relprop(
                b, adapter.block(b), saved, out, relevance, b > start, clone_rule, scratch
            )
            out = saved["resid_pre"]
            yield b, r_attn

    def _head_relprop(self, normed: Tensor, r_out: Tensor) -> tuple[Tensor, Tensor | None]:
        """Relevance of the normed last-block tokens from the relevance ``r_out`` of the logits.

        The head reads the class token, the patch mean, or both concatenated (``_READERS``),
        each after ``post_pool_norm`` (a norm: passes), then runs ``adapter.head_path``:
        LRP-alpha1-beta0 through its linear maps, its constant factors passing. The class token's
        share goes back by the index-select z-rule, the patch mean's by the mean's z-rule.

        Returns the relevance (N, k, d) and the rollout seed: None for a head that reads the class
        token alone (the map is the class-token row), else (N, T), the tokens' weights in the head's
        input (class token 1, each patch 1/P), each reader's weights times its share of the head's
        relevance (1 for a head with one reader).
        """
        adapter = self.adapter
        cd = normed.dtype
        readers = _READERS[adapter.pooling]
        p = adapter.num_prefix_tokens
        cls = adapter.class_token_index if "cls" in readers else None
        pooled = [
            adapter.post_pool_norm(normed[:, cls] if r == "cls" else normed[:, p:].mean(1)) for r in readers
        ]
        steps = adapter.head_path
        h = pooled[0] if len(pooled) == 1 else torch.cat(pooled, -1)
        inputs = [h]
        for step in steps[:-1]:  # the inputs of every step (the last step's output is not needed)
            if isinstance(step, ConstantFactor):
                h = step(h)
            else:
                h = F.linear(h, step.weight.to(cd), _cast(step.bias, cd))
            inputs.append(h)
        r = r_out
        for step, x in zip(reversed(steps), reversed(inputs)):
            if not isinstance(step, ConstantFactor):  # a positive per-example factor: passes
                r = lrp_linear_alpha1_beta0(x, step.weight.to(cd), r)
        if readers == ("cls",):
            return lrp_select_z(normed, cls, r), None
        d = normed.shape[-1]
        relevance = torch.zeros_like(normed)
        seed = normed.new_zeros(normed.shape[:2])
        num_patches = normed.shape[1] - p
        total = r.sum(-1)
        for i, reader in enumerate(readers):
            r_i = r[:, i * d : (i + 1) * d]
            share = _share(r_i.sum(-1), total) if len(readers) > 1 else torch.ones_like(total)
            if reader == "cls":
                relevance += lrp_select_z(normed, cls, r_i)
                seed[:, cls] = share
            else:
                relevance[:, p:] += lrp_mean_z(normed[:, p:], r_i)
                seed[:, p:] = (share / num_patches).unsqueeze(1)
        return relevance, seed

    def _block_relprop(
        self,
        b: int,
        parts: BlockParts,
        saved: dict[str, Tensor],
        out: Tensor,
        relevance: Tensor,
        go_on: bool,
        clone_rule: str,
        scratch: _WeightParts,
    ) -> tuple[Tensor | None, Tensor]:
        """One block backwards from the relevance of its output ``out`` (the forward's tensor).

        When the block was computed for its first k tokens only (the last block, see
        :meth:`_forward`), ``out``, ``relevance`` and the saved post-attention tensors hold
        those k rows: the rules act per token, except the per-example totals of the residual
        Add, which the other rows (with zero relevance) would not change. Returns (relevance
        of the block input, or None when ``go_on`` is False; R_A after halving).
        """
        adapter = self.adapter
        cd = relevance.dtype
        exact_dtype = saved["resid_pre"].dtype == cd  # the forward's sums are the rules' sums

        def get(name: str) -> Tensor:
            return saved[name].to(cd)

        x_full = get("resid_pre")
        mid, mlp_out, attn_out = get("resid_mid"), get("mlp_out"), get("attn_out")
        n, k = mid.shape[:2]
        seq = x_full.shape[1]
        x_in = x_full[:, :k]
        out = out.to(cd) if exact_dtype else mid + mlp_out
        heads, hd = adapter.num_heads, adapter.head_dim

        def linear(x: Tensor, module: nn.Linear, r: Tensor, output: str) -> Tensor:
            # The forward's output gives x W^T (recomputed in float32 for half-precision models).
            if not exact_dtype:
                return _linear_relprop(x, module.weight.to(cd), r, parts=scratch)
            return _linear_relprop(x, module.weight, r, get(output), module.bias, scratch)

        # MLP sub-layer: out = mid + mlp_post(fc2(mid_norm(act(fc1(norm2(mid))))))
        r_mid, r_mlp = _add_relprop(mid, mlp_out, out, relevance)
        r_mlp = _post_relprop(parts.mlp_post, mlp_out, r_mlp)
        r_keys = linear(get("fc2_in"), parts.fc2, r_mlp, "fc2_out")  # mid norm, act: pass
        if parts.mlp_in is None:
            r_u2 = linear(parts.norm2(saved["resid_mid"]).to(cd), parts.fc1, r_keys, "fc1_out")  # norm2: pass
        else:
            # Gated MLP, keys = gate(u) * fc1(u): the gate is a constant multiplier (its elementwise
            # z-rule passes the relevance), so all of it goes to the signal branch fc1.
            u2 = parts.norm2(saved["resid_mid"]).to(cd)
            r_u2 = _linear_relprop(u2, parts.fc1.weight.to(cd), r_keys, parts=scratch)
        r_mid = lrp_clone(mid, (r_mid, r_u2), clone_rule)
        # Attention sub-layer: mid = x + attn_post(proj(out_norm(A @ v)))
        r_x, r_attn = _add_relprop(x_in, attn_out, mid if exact_dtype else x_in + attn_out, r_mid)
        r_attn = _post_relprop(parts.attn_post, attn_out, r_attn)
        r_z = linear(get("proj_in"), parts.proj, r_attn, "proj_out")
        r_z = r_z.view(n, k, heads, hd).transpose(1, 2)  # (n, H, k, hd)
        # One contiguous copy each, so that every product below reads them without copying.
        probs, v = get("attn_probs"), get("v").contiguous()
        z = get("attn_keys").view(n, k, heads, hd).transpose(1, 2) if exact_dtype else probs @ v
        r_a, r_v = _matmul_relprop(probs, v, z, r_z)  # A @ v: z-rule, halved
        if not go_on:
            return None, r_a
        # softmax, scale: pass; Q K^T with the z-rule on the unscaled q, k (as the authors).
        q, kt = get("q").contiguous(), get("k").contiguous().transpose(-1, -2)
        r_q, r_k = _matmul_relprop(q, kt, q @ kt, r_a)
        if k < seq:  # back to the full sequence: the other query rows have no relevance
            r_q = F.pad(r_q, (0, 0, 0, seq - k))
            r_x = F.pad(r_x, (0, 0, 0, seq - k))
        r_k = r_k.transpose(-1, -2)
        u1 = parts.norm1(saved["resid_pre"])
        if parts.rope is not None:
            # q, k above are rotated; the rotation is linear in (q, k): its z-rule (per 2x2 pair).
            q0, k0, _ = parts.qkv(u1)
            rope = parts.rope
            r_q, r_k = lrp_linear_map_z(lambda a, c: rope(a, c, None), (q0.to(cd), k0.to(cd)), (r_q, r_k))
        # q/k/v projection (norm1: pass). Its output columns are separate outputs, each with its own
        # denominator, so the rule can run on column groups and sum at the input: the last block
        # takes the q columns for its k query rows only (the others carry no relevance).
        u1, width = u1.to(cd), heads * hd
        weight, bias = _qkv_weight(parts).to(cd), parts.qkv_bias
        # When q, k, v are the projection's own output, it is read back for the shared denominator.
        reuse = exact_dtype and parts.qkv_is_projection and parts.rope is None

        def heads_joined(ts: list[Tensor], rows: int) -> Tensor:
            """(n, H, >= rows, hd) tensors -> their first rows as (n, rows, len(ts) * H * hd)."""
            return torch.cat([t[:, :, :rows].transpose(1, 2).reshape(n, rows, width) for t in ts], -1)

        def qkv_relprop(rows: int, first: int, rel: list[Tensor], outs: list[Tensor]) -> Tensor:
            """The rule for the first ``rows`` tokens and the column groups from ``first`` (0 q, 1 k, 2 v) on."""
            cols = slice(first * width, (first + len(rel)) * width)
            y = heads_joined(outs, rows) if reuse else None
            b_cols = None if bias is None else bias[cols]
            return _linear_relprop(u1[:, :rows], weight[cols], heads_joined(rel, rows), y, b_cols, scratch)

        if k == seq:
            r_u1 = qkv_relprop(seq, 0, [r_q, r_k, r_v], [q, kt.mT, v])
        else:
            r_u1 = qkv_relprop(seq, 1, [r_k, r_v], [kt.mT, v])
            r_u1[:, :k] += qkv_relprop(k, 0, [r_q], [q])
        return lrp_clone(x_full, (r_x, r_u1), clone_rule), r_a


def _share(part: Tensor, total: Tensor) -> Tensor:
    """``part / total``, 0 where ``total == 0``."""
    return torch.where(total != 0, part / total.masked_fill(total == 0, 1), 0.0)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


__all__ = [
    "CheferRelevancy",
    "safe_divide",
    "lrp_linear_alpha1_beta0",
    "lrp_matmul_z",
    "lrp_add_conserving",
    "lrp_select_z",
    "lrp_mean_z",
    "lrp_linear_map_z",
    "lrp_elementwise_z",
    "lrp_clone",
    "CLONE_RULES",
    "READOUTS",
]
